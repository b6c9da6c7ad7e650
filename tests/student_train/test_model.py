"""The student model: presets, RoPE, masks and positions, HF export equal to transformers."""

from __future__ import annotations

import pytest
import torch

from kdcache.errors import ConfigMismatchError
from kdcache.student_train.model import (ModelArgs, Student, load_hf, mode_for_packing,
                                         save_hf)
from kdcache.student_train.rope import positions_for


def _model(**kw) -> Student:
    torch.manual_seed(0)
    return Student(ModelArgs.from_preset("tiny", vocab_size=300, **kw)).eval()


def test_paper_preset_is_the_papers_student():
    args = ModelArgs.from_preset("paper-1.1b")
    assert (args.n_layer, args.n_head, args.n_kv_head, args.dim, args.ffn_dim, args.head_dim) \
        == (30, 20, 4, 1280, 6144, 64)
    assert args.vocab_size == 202_048
    assert 1.075e9 < args.n_params() < 1.09e9  # "1.1B" with tied embeddings
    tiny = Student(ModelArgs.from_preset("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) == tiny.args.n_params()


def test_positions_reset_and_global():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_for(seg, "reset").tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert positions_for(seg, "global").tolist() == [list(range(8))]


def test_packing_modes_map_and_mismatch_is_refused():
    assert mode_for_packing("causal") == ("causal", "global")
    assert mode_for_packing("document") == ("document", "reset")
    assert mode_for_packing("document-global") == ("document", "global")
    with pytest.raises(ConfigMismatchError, match="document-global"):
        mode_for_packing("document-global", "causal", None, where="ds")
    assert mode_for_packing("causal", "document", "reset", force=True) == ("document", "reset")


def test_document_reset_equals_documents_run_separately():
    causal, doc = _model(), _model(attention="document", positions="reset")
    tokens = torch.randint(0, 300, (1, 70))
    seg = torch.zeros(1, 70, dtype=torch.int32)
    seg[:, 30:] = 1
    with torch.no_grad():
        packed = doc(tokens, seg)
        first, second = causal(tokens[:, :30]), causal(tokens[:, 30:])
    torch.testing.assert_close(packed[:, :30], first, atol=2e-5, rtol=0)
    torch.testing.assert_close(packed[:, 30:], second, atol=2e-5, rtol=0)


def test_document_global_isolates_documents_but_keeps_positions():
    model = _model(attention="document", positions="global")
    tokens = torch.randint(0, 300, (1, 64))
    seg = torch.zeros(1, 64, dtype=torch.int32)
    seg[:, 20:] = 1
    other = tokens.clone()
    other[:, :20] = torch.randint(0, 300, (1, 20))  # change document 0 only
    with torch.no_grad():
        a, b = model(tokens, seg), model(other, seg)
        moved = model(tokens[:, 20:])  # document 1 alone, at positions 0..43
    torch.testing.assert_close(a[:, 20:], b[:, 20:], atol=1e-6, rtol=0)  # no cross-doc attention
    # Pure RoPE + document mask: a document's outputs depend on relative positions only, so the
    # shift to positions 20.. changes them by rounding alone (MISSION.md's subtlety)...
    torch.testing.assert_close(a[:, 20:], moved, atol=1e-4, rtol=0)
    # ...while the rotation itself does see the global positions.
    from kdcache.student_train.rope import rope_cos_sin

    cos_global, _ = rope_cos_sin(positions_for(seg, "global"), 64, 10_000.0)
    cos_reset, _ = rope_cos_sin(positions_for(seg, "reset"), 64, 10_000.0)
    assert (cos_global[:, 21] - cos_reset[:, 21]).abs().max() > 0.1


def test_padding_rows_do_not_change_real_tokens():
    model = _model(attention="document", positions="reset")
    tokens = torch.randint(0, 300, (2, 40))
    seg = torch.zeros(2, 40, dtype=torch.int32)
    seg[1, 25:] = -1  # row 1 padded after 25 tokens
    with torch.no_grad():
        out = model(tokens, seg)
        alone = model(tokens[1:, :25])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:, :25], alone, atol=2e-5, rtol=0)


def test_flex_block_mask_matches_sdpa_mask():
    from torch.nn.attention.flex_attention import flex_attention

    from kdcache.student_train.model import AttentionContext

    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    sdpa = AttentionContext(seg, "document", "sdpa")
    flex = AttentionContext(seg, "document", "flex")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa.sdpa_mask,
                                                            enable_gqa=True)
    got = flex_attention(q, k, v, block_mask=flex.block_mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hf_export_matches_transformers_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(rope_theta=500_000.0)
    save_hf(model, str(tmp_path / "hf"), dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings
    tokens = torch.randint(0, 300, (2, 96))
    with torch.no_grad():
        ours = model.logits(model(tokens))
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    reloaded = load_hf(str(tmp_path / "hf")).eval()
    assert reloaded.args.rope_theta == 500_000.0
    with torch.no_grad():
        torch.testing.assert_close(reloaded.logits(reloaded(tokens)), ours, atol=0, rtol=0)


def test_theta_changes_the_function():
    model = _model()
    tokens = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        before = model(tokens)
        model.set_theta(500_000.0)
        after = model(tokens)
    assert model.args.rope_theta == 500_000.0
    assert (before - after).abs().max() > 1e-3
    torch.testing.assert_close(before[:, 0], after[:, 0])  # position 0 is not rotated
