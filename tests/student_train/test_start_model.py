"""A start model (`init_from`) is reproduced exactly by the Student, or refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache.errors import ConfigMismatchError
from kdcache.student_train.model import load_hf, read_hf_args

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=256, tie_word_embeddings=True)


def _save_llama(path, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, **config})).eval()
    model.save_pretrained(str(path))
    return model


def test_an_hf_llama_start_model_is_reproduced_exactly(tmp_path):
    hf = _save_llama(tmp_path / "llama", rope_theta=500_000.0, rms_norm_eps=1e-6)
    args = read_hf_args(str(tmp_path / "llama"))
    assert (args.rope_theta, args.norm_eps) == (500_000.0, 1e-6)
    student = load_hf(str(tmp_path / "llama")).eval()
    tokens = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(student.logits(student(tokens)), hf(tokens).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config, field", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_theta=500_000.0, max_position_embeddings=131072,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     "rope_type 'llama3'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_a_llama_the_student_cannot_compute_is_refused_naming_the_field(tmp_path, config, field):
    _save_llama(tmp_path / "llama", **config)
    with pytest.raises(ConfigMismatchError, match=field):
        read_hf_args(str(tmp_path / "llama"))
    with pytest.raises(ConfigMismatchError, match=field):
        load_hf(str(tmp_path / "llama"))


def test_a_qwen3_start_model_is_refused_by_its_model_type(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=64)).save_pretrained(str(tmp_path / "qwen3"))
    with pytest.raises(ConfigMismatchError, match="model_type 'qwen3' is not 'llama'"):
        load_hf(str(tmp_path / "qwen3"))


@pytest.mark.slow
def test_training_from_an_hf_llama_keeps_its_theta(doc_dataset, tmp_path, tiny_run):
    """No rope_theta in the stage: the exported student has the start model's 500k, not 10k."""
    from kdcache.student_train.stages import parse_run, run

    _save_llama(tmp_path / "llama", rope_theta=500_000.0)
    raw = tiny_run([doc_dataset], tmp_path / "run", steps=2,
                   stages=[{"name": "s1", "init_from": str(tmp_path / "llama")}])
    summary, = run(parse_run(raw))
    assert summary["rope_theta"] == 500_000.0
    with open(tmp_path / "run" / "s1" / "hf" / "config.json") as handle:
        assert json.load(handle)["rope_parameters"]["rope_theta"] == 500_000.0
