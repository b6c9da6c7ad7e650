"""`kdcache eval lm` on a logit dataset whose targets are the tiny model's own top-k."""

import json
import math
import os

import numpy as np
import pytest
import torch

from kdcache.cli import main
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.packing import default_valid
from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import DatasetWriter
from kdcache.evaluate.models import load_model

K = 8


def _windows(seed: int, count: int, n: int, bos: int, eos: int, vocab: int):
    rng = np.random.default_rng(seed)
    for w in range(count):
        cuts = np.sort(rng.choice(np.arange(4, n - 3), size=3, replace=False))
        offsets = np.concatenate([[0], cuts, [n]])
        tokens = rng.integers(3, vocab, size=n)
        tokens[offsets[:-1]] = bos
        tokens[offsets[1:] - 1] = eos
        yield w, tokens, offsets


def _teacher_topk(model, tokens, offsets, mode):
    """Teacher targets computed independently of kdcache: one forward over the window with an
    explicit mask (block-diagonal causal unless `causal`) and the mode's positions."""
    n = len(tokens)
    doc = torch.as_tensor(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if mode != "causal":
        allowed &= doc[:, None] == doc[None, :]
    positions = torch.arange(n)
    if mode == "document":
        positions = positions - torch.as_tensor(offsets[:-1])[doc]
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens)[None], attention_mask=mask,
                       position_ids=positions[None]).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    values, ids = lp.topk(K, dim=-1)
    return ids.numpy().astype(np.int32), values.float().numpy(), lp


@pytest.fixture(scope="module", params=["document-global", "document", "causal"])
def logit_dataset(request, tiny_model_dir, tmp_path_factory):
    mode = request.param
    root = str(tmp_path_factory.mktemp("lm") / f"targets-{mode}")
    loaded = load_model(tiny_model_dir)
    model, vocab = loaded.model, loaded.model.config.vocab_size
    n = 96
    header = DatasetHeader(kind="topk", k=K, vocab_size=vocab, codec="raw",
                           packing={"window": n, "mode": mode, "bos_id": 1,
                                    "eos_id": 2, "seed": 0},
                           teacher={"name": "tiny-llama", "path": tiny_model_dir})
    ce_rows = []
    with DatasetWriter(root, header, windows_per_shard=2) as writer:
        for w, tokens, offsets in _windows(0, 3, n, 1, 2, vocab):
            ids, values, lp = _teacher_topk(model, tokens, offsets, mode)
            valid = default_valid(n, offsets, mode)
            writer.add(WindowRecord(window_index=w, tokens=tokens, doc_offsets=offsets,
                                    valid=valid, ids=ids, values=values))
            rows = np.nonzero(valid)[0]
            ce_rows += (-lp[rows, tokens[rows + 1]]).tolist()
    return root, float(np.mean(ce_rows)), mode


def test_eval_lm_self_kl_zero_and_perplexity(logit_dataset, tiny_model_dir, tiny_model_dir_b,
                                             tmp_path):
    root, reference_ce, mode = logit_dataset
    out = str(tmp_path / "lm")
    rc = main(["eval", "lm", tiny_model_dir, tiny_model_dir_b, "--data", root, "--out", out])
    assert rc == 0
    with open(os.path.join(out, "lm.json")) as f:
        result = json.load(f)
    assert os.path.getsize(os.path.join(out, "lm_position.png")) > 10_000
    same, other = result["models"]
    assert result["packing_mode"] == mode and result["windows"] == 3
    # Every row except the window's last, and in document modes each document's EOS.
    assert same["rows"] == 3 * (96 - (1 if mode == "causal" else 4))
    assert same["cross_entropy"] == pytest.approx(reference_ce, rel=1e-4)
    assert same["perplexity"] == pytest.approx(math.exp(reference_ce), rel=1e-4)
    assert same["kl_to_teacher"] < 1e-5  # the teacher itself
    assert other["kl_to_teacher"] > 1e-3  # a model with changed queries
    assert sum(b["rows"] for b in same["by_position"]) == same["rows"]


def test_eval_lm_rejects_bad_data(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "lm", tiny_model_dir, "--data", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_eval_lm_refuses_a_smaller_vocabulary(logit_dataset, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    root, _, _ = logit_dataset
    small = str(tmp_path / "small-vocab")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=1, head_dim=64,
                                 num_key_value_heads=1)).save_pretrained(small)
    assert main(["eval", "lm", small, "--data", root, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 64" in err and root in err


def test_eval_lm_last_windows(logit_dataset, tiny_model_dir, tmp_path, capsys):
    """--last-windows N evaluates windows [len - N, len): the ones training held out."""
    root, _, _ = logit_dataset
    out = str(tmp_path / "lm")
    assert main(["eval", "lm", tiny_model_dir, "--data", root, "--out", out, "--last-windows", "2"]) == 0
    with open(os.path.join(out, "lm.json")) as f:
        result = json.load(f)
    assert result["windows"] == 2 and result["window_range"] == [1, 3]
    assert main(["eval", "lm", tiny_model_dir, "--data", root, "--out", out, "--last-windows", "4"]) == 2
    assert "--last-windows 4 must be in [1, 3]" in capsys.readouterr().err
