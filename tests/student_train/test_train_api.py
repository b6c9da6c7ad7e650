"""kdcache.train_api: the dataset, the loss and compute_loss as a library; the two examples run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kdcache import train_api
from kdcache.student_train.hf_student import load_hf_student
from kdcache.student_train.module import LossConfig, distillation_loss
from tests.student_train.hf_models import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_tiny("qwen3", str(tmp_path_factory.mktemp("api-qwen3") / "qwen3"))


def test_window_dataset_yields_ready_batches_in_the_datas_mode(doc_dataset):
    data = train_api.WindowDataset([doc_dataset], epochs=1, batch_windows=2)
    assert (data.attention, data.positions) == ("document", "reset")
    batches = list(data)
    assert len(batches) == 6  # 12 windows, 2 per batch, one epoch
    batch = train_api.collate(batches[:1])
    assert set(batch) == set(train_api.BATCH_KEYS)
    seg, pos = batch["seg_ids"], batch["position_ids"]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert bool((pos[starts] == 0).all()) and bool((pos[~starts] > 0).all())
    assert batch["target_ids"].shape[:2] == batch["tokens"].shape
    # the same order as kdcache train's loader: seeded, so a second pass repeats it
    again = list(train_api.WindowDataset([doc_dataset], epochs=1, batch_windows=2))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


def test_distill_loss_and_compute_loss_equal_the_trainers_loss(doc_dataset, qwen3_dir):
    from transformers import AutoModelForCausalLM

    data = train_api.WindowDataset([doc_dataset], epochs=1)
    batch = train_api.collate([next(iter(data))])
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    hidden = train_api.hidden_states(model, batch, data.attention, data.positions)
    kd, ce = train_api.distill_loss(hidden, model.get_output_embeddings(), batch, alpha=0.5)
    loss, parts = train_api.compute_loss(model, batch, True, alpha=0.5,
                                         attention=data.attention, positions=data.positions)
    student = load_hf_student(qwen3_dir, attention="document", positions="reset")
    ref = distillation_loss(student, batch, LossConfig(alpha=0.5))
    kd, ce, loss = kd.detach(), ce.detach(), loss.detach()
    assert math.isclose(float(kd), float(ref["kd"]), rel_tol=1e-5)
    assert math.isclose(float(ce), float(ref["ce"]), rel_tol=1e-5)
    assert math.isclose(float(loss), float(ref["loss"]), rel_tol=1e-5)
    assert math.isclose(float(parts["kd"]), float(kd), rel_tol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["plain_loop.py", "hf_trainer.py"])
def test_examples_train_a_tiny_model(doc_dataset, qwen3_dir, tmp_path, example):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", example), "--student", qwen3_dir,
         "--data", doc_dataset, "--steps", "3", "--lr", "1e-3", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if example == "plain_loop.py":
        steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert all(math.isfinite(s["loss"]) for s in steps)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(out))
    source = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    moved = [float((a - b).abs().max()) for a, b in zip(trained.parameters(), source.parameters())]
    assert max(moved) > 0  # the examples trained (three optimizer steps)
