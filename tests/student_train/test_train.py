"""Real Lightning training on CPU: resume reproduces the loss curve, stages, `kdcache train`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdcache.errors import ConfigMismatchError
from kdcache.student_train.stages import parse_run, run, run_stage

pytestmark = pytest.mark.slow


class _Killed(RuntimeError):
    pass


class KillAt:
    """Stops training abruptly (an exception, like a crash) when `step` steps are done."""

    def __new__(cls, step):
        import lightning.pytorch as pl

        class _Kill(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == step:
                    raise _Killed(f"killed at step {step}")

        return _Kill()


class Record:
    """Collects each step's loss (and the windows' first tokens) from the running module."""

    def __new__(cls, into):
        import lightning.pytorch as pl

        class _Record(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                into.append((float(outputs["loss"]), batch["tokens"][:, :4].clone()))

        return _Record()


def test_resume_reproduces_the_uninterrupted_loss_curve(doc_dataset, tmp_path, tiny_run):
    steps = 6  # 12 windows, batch 2: the epoch ends at step 6 and a second one begins
    raw = tiny_run([doc_dataset], tmp_path / "full", steps=steps + 2, checkpoint_every=2)
    raw["defaults"]["data"]["batch_windows"] = 2
    full: list = []
    run(parse_run(raw), callbacks=[Record(full)])

    raw["output_dir"] = str(tmp_path / "killed")
    cfg = parse_run(raw)
    before: list = []
    with pytest.raises(_Killed):
        run(cfg, callbacks=[KillAt(5), Record(before)])
    assert len(before) == 5 and os.path.exists(tmp_path / "killed/s1/checkpoints/last.ckpt")
    after: list = []
    summaries = run(cfg, callbacks=[Record(after)])  # resumes from last.ckpt (step 4)
    assert summaries[0]["resumed_from"].endswith("last.ckpt")
    assert len(after) == steps + 2 - 4
    resumed = before[:4] + after
    assert [loss for loss, _ in resumed] == [loss for loss, _ in full]  # exactly, on CPU
    for (_, a), (_, b) in zip(resumed, full):
        assert torch.equal(a, b)  # the same windows in the same order
    assert summaries[0]["data_state"] == {"seed": 7, "epoch": 1, "consumed": 4}


def test_phasewise_stages_via_the_cli(doc512_dataset, tmp_path):
    from kdcache.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "tiny-phasewise-kd", "--data", doc512_dataset, "--out",
                 str(out), "--max-steps", "2", "--workers", "0", "--holdout-windows", "1", "--json"])
    assert code == 0
    s1, s2 = (json.loads((out / s / "summary.json").read_text()) for s in ("stage1", "stage2"))
    assert s1["holdout_windows"] == s2["holdout_windows"] == 1
    assert (s1["rope_theta"], s2["rope_theta"]) == (10_000.0, 500_000.0)
    assert (s1["attention"], s1["positions"]) == ("document", "reset")
    assert s2["init_from"] == str(out / "stage1" / "hf")
    config = json.loads((out / "stage2" / "hf" / "config.json").read_text())
    assert config["rope_theta"] == 500_000.0 and config["architectures"] == ["LlamaForCausalLM"]
    # stage 2 started from stage 1's weights: the embedding moved only by stage 2's 2 steps
    from safetensors.torch import load_file

    w1 = load_file(str(out / "stage1/hf/model.safetensors"))["model.embed_tokens.weight"].float()
    w2 = load_file(str(out / "stage2/hf/model.safetensors"))["model.embed_tokens.weight"].float()
    fresh = torch.randn_like(w1) * 0.02
    assert (w2 - w1).abs().mean() < 0.2 * (fresh - w1).abs().mean()
    # a second call finds both stages finished and trains nothing
    assert main(["train", "--config", "tiny-phasewise-kd", "--data", doc512_dataset, "--out",
                 str(out), "--max-steps", "2", "--json"]) == 0


def test_ce_baseline_and_mode_mismatch(docglobal_dataset, tmp_path, tiny_run):
    raw = tiny_run([docglobal_dataset], tmp_path, steps=2, alpha=0.0)
    summary = run(parse_run(raw))[0]
    assert (summary["attention"], summary["positions"]) == ("document", "global")
    assert summary["final_loss"] == pytest.approx(summary["metrics"]["ce"])
    raw = tiny_run([docglobal_dataset], tmp_path / "x", steps=2)
    raw["defaults"]["model"]["attention"] = "causal"
    with pytest.raises(ConfigMismatchError, match="force_mode"):
        run(parse_run(raw))


def test_ddp_gloo_two_processes_then_resume_on_one(doc_dataset, tmp_path, tiny_run):
    """Lightning DDP (2 CPU processes, gloo), then resume the run on 1 process."""
    raw = tiny_run([doc_dataset], tmp_path, steps=2, checkpoint_every=2,
                   strategy="ddp_spawn", devices=2)
    cfg = parse_run(raw)
    stage = cfg.stages[0]
    run_stage(stage, str(tmp_path / "s1"), resume=False)
    ckpt = torch.load(tmp_path / "s1/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    state = ckpt["WindowDataModule"]
    assert state["consumed"] == 4  # 2 steps x 2 ranks x 1 window
    # resume on one process: it continues at window 4 of the same epoch order
    stage.trainer.strategy, stage.trainer.devices, stage.trainer.max_steps = "auto", 1, 4
    os.remove(tmp_path / "s1/summary.json")
    seen: list = []
    summary = run_stage(stage, str(tmp_path / "s1"), callbacks=[Record(seen)])
    assert summary["resumed_from"].endswith("last.ckpt")
    assert summary["data_state"]["consumed"] == 6
    from kdcache.formats.reader import open_dataset
    from kdcache.student_train.data import epoch_order

    ds = open_dataset(doc_dataset)
    order = epoch_order(len(ds), 7, 0)
    expected = [ds[int(i)].tokens[:4].long() for i in order[4:6]]
    assert len(seen) == 2
    for (_, got), want in zip(seen, expected):
        assert torch.equal(got[0], want)


def test_fused_adamw_under_bf16_clips_gradients(doc_dataset, tmp_path, tiny_run):
    """Fused AdamW (the CUDA default) "handles unscaling", which Lightning's mixed-precision
    plugin answers by refusing to clip; under bf16 there is no scaler, so the module clips: a
    clip of 1e-12 must shrink Adam's first steps (updates ~ g / (sqrt(v) + eps)) to nothing."""
    from safetensors.torch import load_file

    moved = {}
    for clip in (0.0, 1e-12):
        raw = tiny_run([doc_dataset], tmp_path / f"clip{clip}", steps=2, checkpoint_every=2,
                       precision="bf16-mixed", gradient_clip_val=clip)
        raw["defaults"]["optim"].update(fused=True, weight_decay=0.0, warmup_steps=0)
        raw["defaults"]["model"]["init_seed"] = 3
        summary = run(parse_run(raw))[0]
        raw["defaults"]["trainer"]["max_steps"] = 0
        raw["output_dir"] = str(tmp_path / f"start{clip}")
        start = run(parse_run(raw))[0]
        a = load_file(os.path.join(summary["hf_dir"], "model.safetensors"))
        b = load_file(os.path.join(start["hf_dir"], "model.safetensors"))
        moved[clip] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved[0.0] > 1e-4 and moved[1e-12] < moved[0.0] / 100
