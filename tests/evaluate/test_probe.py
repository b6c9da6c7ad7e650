"""The positional probe on a tiny random Llama (n=64 tokens x 8 repeats)."""

import json
import os

import pytest
import torch

from kdcache.cli import main
from kdcache.evaluate.capture import ActivationRecorder
from kdcache.evaluate.probe import ProbeConfig, build_block, run_mode
from kdcache.evaluate.models import UnsupportedModelError, load_model

N, R = 64, 8


@pytest.fixture(scope="module")
def probe_out(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("probe"))
    rc = main(["probe", tiny_model_dir, "--out", out, "--block", str(N), "--repeats", str(R),
               "--dtypes", "float32,bfloat16,float16", "--batch-blocks", "3"])
    assert rc == 0
    with open(os.path.join(out, "probe.json")) as f:
        return out, json.load(f)


def test_probe_writes_plots_and_json(probe_out):
    out, summary = probe_out
    for name in summary["plots"]:
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    assert len(summary["plots"]) == 5
    assert summary["block_token_ids"][0] == 1 and summary["block_token_ids"][-1] == 2
    assert len(summary["block_token_ids"]) == N


def test_probe_kl_by_mode_and_dtype(probe_out):
    _, summary = probe_out
    runs = {(r["mode"], r["dtype"]): r for r in summary["runs"]}
    dtypes = {d for _, d in runs}
    assert {"float32", "bfloat16"} <= dtypes
    for dtype in dtypes:
        # Positions from 0 in every block: identical inputs, identical outputs.
        assert max(runs[("document", dtype)]["kl_mean"]) == 0.0
        # Global positions under a document mask: only rounding, far below cross-block attention.
        dg = runs[("document-global", dtype)]["kl_mean"][1:]
        causal = runs[("causal", dtype)]["kl_mean"][1:]
        assert max(dg) < 0.05 * min(causal)
    assert max(runs[("document-global", "float32")]["kl_mean"]) < 1e-5
    assert (max(runs[("document-global", "bfloat16")]["kl_mean"])
            > max(runs[("document-global", "float32")]["kl_mean"]))
    assert runs[("document-global", "float32")]["positions"] == [r * N + N - 2 for r in range(R)]


def test_probe_query_states_pre_and_post_rope(probe_out):
    _, summary = probe_out
    run = next(r for r in summary["runs"] if r["mode"] == "document-global"
               and r["dtype"] == "float32")
    for layer in ("0", "1"):
        assert min(run["query_pre_cosine"][layer]) > 1 - 1e-6  # position-invariant before RoPE
        assert min(run["query_post_cosine"][layer]) < 0.99  # rotated apart after
    element = summary["primary"]["query_element"]
    assert max(element["pre_distance"]) < 1e-5 < max(element["post_distance"])
    assert summary["primary"]["top_tokens"]["same_top_k_set"][0] is True
    assert len(summary["primary"]["top_tokens"]["tokens"]) == 10


def test_post_rope_capture_is_the_rotation_of_pre_rope(tiny_model_dir):
    from kdcache.evaluate.rope_plan import pair_frequencies

    loaded = load_model(tiny_model_dir)
    cfg = ProbeConfig(block_tokens=N, repeats=3, modes=("document-global",), dtypes=("float32",))
    block = build_block(loaded.tokenizer, tiny_model_dir, N)
    run = run_mode(loaded, block, cfg, "document-global", "float32")
    pre, post = run.captured["q_pre.0"], run.captured["q_post.0"]  # [R, heads * 64]
    freqs = torch.tensor(pair_frequencies(64, 10000.0), dtype=torch.float64)
    for r, pos in enumerate(run.positions):
        q = pre[r].double().view(2, 64)
        angle = pos * freqs
        cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
        rotated = q * cos + torch.cat([-q[:, 32:], q[:, :32]], dim=1) * sin
        torch.testing.assert_close(post[r].double().view(2, 64), rotated, atol=1e-4, rtol=1e-4)


def test_blockwise_document_global_equals_one_masked_forward(tiny_model_dir):
    """The probe's method (each block alone, position_ids offset) against one forward over the
    whole window with an explicit block-diagonal causal mask and global positions."""
    loaded = load_model(tiny_model_dir)
    model = loaded.model
    n, repeats = 32, 3
    block = build_block(loaded.tokenizer, tiny_model_dir, n)
    cfg = ProbeConfig(block_tokens=n, repeats=repeats, modes=("document-global",),
                      dtypes=("float32",), batch_blocks=2)
    run = run_mode(loaded, block, cfg, "document-global", "float32")
    total = n * repeats
    doc = torch.arange(total) // n
    allowed = (doc[:, None] == doc[None, :]) & (torch.arange(total)[:, None]
                                                >= torch.arange(total)[None, :])
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))
    ids = torch.tensor(block).repeat(repeats)[None]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                     position_ids=torch.arange(total)[None],
                                     use_cache=False).last_hidden_state[0]
    rows = torch.arange(repeats) * n + n - 2
    torch.testing.assert_close(run.captured["final"], hidden[rows], atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen"):
        ActivationRecorder(model)


def test_probe_errors_name_the_problem(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["probe", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_probe_user_text_without_queries(tiny_model_dir, tmp_path):
    text = tmp_path / "block.txt"
    text.write_text("Stones skip over the river while the fox waits. " * 3)
    out = str(tmp_path / "o")
    assert main(["probe", tiny_model_dir, "--out", out, "--block", "16", "--repeats", "3",
                 "--modes", "document-global", "--dtypes", "float32", "--text", str(text),
                 "--no-queries", "--json"]) == 0
    with open(os.path.join(out, "probe.json")) as f:
        summary = json.load(f)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert summary["block_token_ids"][1:15] == tok(text.read_text(),
                                                   add_special_tokens=False)["input_ids"][:14]
    run = summary["runs"][0]
    assert run["query_pre_cosine"] == {} and summary["primary"]["query_element"] == {}
    assert set(summary["plots"]) == {"probe_layer_cosine.png", "probe_top10.png", "probe_kl.png"}


def test_chunked_causal_forward_equals_one_forward(tiny_model_dir):
    """Long causal windows run in query chunks over a KV cache (bounded attention memory); the
    result must match one forward, chunk edges not aligned with blocks."""
    loaded = load_model(tiny_model_dir)
    n, repeats = 32, 4
    block = build_block(loaded.tokenizer, tiny_model_dir, n)
    whole = run_mode(loaded, block, ProbeConfig(block_tokens=n, repeats=repeats), "causal",
                     "float32")
    chunked = run_mode(loaded, block, ProbeConfig(block_tokens=n, repeats=repeats,
                                                  causal_chunk_tokens=48), "causal", "float32")
    assert set(whole.captured) == set(chunked.captured)
    for key, value in whole.captured.items():
        torch.testing.assert_close(chunked.captured[key], value, atol=1e-4, rtol=1e-4)
    assert chunked.kl_mean == pytest.approx(whole.kl_mean, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3_text", "llama4_text"])
def test_query_capture_on_llama_family_architectures(arch):
    """Same tokens at two offsets: pre-RoPE queries equal, post-RoPE queries differ, in every
    layer that applies RoPE (Llama 4: its NoPE layer 1 has no record)."""
    import transformers as T

    common = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  max_position_embeddings=4096)
    config_cls, model_cls, extra = {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
        "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {}),
        "llama4_text": (T.Llama4TextConfig, T.Llama4ForCausalLM,
                        dict(intermediate_size_mlp=128, num_local_experts=2,
                             no_rope_layers=[1, 0])),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common, **extra)).eval()
    ids = torch.randint(3, 100, (1, 16)).expand(2, 16)
    positions = torch.arange(16)[None] + torch.tensor([[0], [160]])
    with ActivationRecorder(model) as recorder:
        recorder.select(torch.tensor([14]))
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions)
        records = recorder.pop()
    layers = [0] if arch == "llama4_text" else [0, 1]
    assert sorted(k for k in records if k.startswith("q_")) == sorted(
        [f"q_pre.{i}" for i in layers] + [f"q_post.{i}" for i in layers])
    for i in layers:
        pre, post = records[f"q_pre.{i}"], records[f"q_post.{i}"]
        assert (pre[0] - pre[1]).abs().max() < 1e-4
        assert (post[0] - post[1]).abs().max() > 1e-3
