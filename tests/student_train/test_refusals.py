"""Training refuses what it should not train on, before the first step, and never exports a
model trained on a NaN loss; a truncated checkpoint is not a traceback."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kdcache.errors import TargetValidationError
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.synthetic import synthetic_window
from kdcache.formats.writer import DatasetWriter
from kdcache.student_train.data import epoch_order

pytestmark = pytest.mark.slow

WINDOWS, WINDOW, SEED = 4, 128, 7  # SEED: the data seed of the tiny_run fixture


def forge_dataset(root, monkeypatch, tamper, *, vocab=256, header_vocab=None, teacher=None):
    """A hash-consistent dataset whose targets the honest writer would have refused: what a
    hostile or buggy producer can share. `tamper(index, record)` edits each window in place."""
    import kdcache.formats.writer as writer

    def unchecked(rec, header, *, where, pool=None):
        return rec.ids[rec.valid].astype(np.int64), rec.values[rec.valid].astype(np.float32)

    header = DatasetHeader(kind="topk", k=4, vocab_size=header_vocab or vocab, codec="raw",
                           packing={"window": WINDOW, "mode": "document", "bos_id": 1,
                                    "eos_id": 2},
                           teacher=teacher or {"name": "forged"})
    rng = np.random.default_rng(0)
    with monkeypatch.context() as m:
        m.setattr(writer, "validate_window", unchecked)
        with DatasetWriter(root, header, windows_per_shard=2) as w:
            for i in range(WINDOWS):
                rec = synthetic_window(rng, i, WINDOW, vocab, 4, doc_len=(8, 80))
                tamper(i, rec)
                w.add(rec)
    return str(root)


def last_visited():
    """The window the first epoch visits last: refusing it is only possible up front."""
    return int(epoch_order(WINDOWS, SEED, 0)[-1])


class CountSteps:
    def __new__(cls, into):
        import lightning.pytorch as pl

        class _Count(pl.Callback):
            def on_train_batch_start(self, *args):
                into.append(1)

        return _Count()


def _run(raw, steps=None):
    from kdcache.student_train.stages import parse_run, run

    return run(parse_run(raw), callbacks=[CountSteps(steps if steps is not None else [])])


def _first_valid_row(rec):
    return int(np.flatnonzero(rec.valid)[3])


@pytest.mark.parametrize("what, value, message", [
    ("logprob", np.nan, "NaN or infinite"),
    ("logprob", np.inf, "NaN or infinite"),
    ("logprob", 2.5, "above 0"),
    ("id", -1, "out of range"),
    ("id", 999, "out of range"),
])
def test_bad_targets_are_refused_before_the_first_step(tmp_path, monkeypatch, tiny_run, what,
                                                       value, message):
    bad, rows = last_visited(), {}

    def tamper(i, rec):
        if i == bad:
            row = rows["row"] = _first_valid_row(rec)
            if what == "logprob":
                rec.values[row, 0] = value
            else:
                rec.ids[row, 1] = value

    data = forge_dataset(tmp_path / "ds", monkeypatch, tamper)
    steps: list = []
    with pytest.raises(TargetValidationError, match=rf"window {bad}: row {rows['row']}: .*{message}"):
        _run(tiny_run([data], tmp_path / "run", steps=WINDOWS), steps)
    assert steps == []  # not one step trained
    assert not os.path.exists(tmp_path / "run" / "s1" / "hf")


def test_padded_target_ids_beyond_a_smaller_student_are_refused_before_training(
        tmp_path, monkeypatch, tiny_run):
    """A 2,000-token tokenizer under a 2,048-row teacher: the vocabulary check accepts a 2,000-row
    student (every tokenizer id has a row), but the targets hold padded ids 2,000-2,047."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    teacher_dir = tmp_path / "ds" / "teacher"  # a manifest's teacher path counts only inside
    teacher_dir.mkdir(parents=True)
    vocab = {f"t{i}": i for i in range(2000)}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(teacher_dir / "tokenizer.json"))
    bad = last_visited()

    def tamper(i, rec):
        if i == bad:
            rec.ids[_first_valid_row(rec), 2] = 2040

    data = forge_dataset(tmp_path / "ds", monkeypatch, tamper, vocab=2000, header_vocab=2048,
                         teacher={"name": "padded", "path": str(teacher_dir)})
    raw = tiny_run([data], tmp_path / "run", steps=WINDOWS)
    raw["defaults"]["model"].update(vocab_size=2000, tokenizer=str(teacher_dir))
    steps: list = []
    with pytest.raises(TargetValidationError, match=rf"window {bad} row \d+ holds token/target id "
                                                    r"2040, but the student's vocabulary has 2000"):
        _run(raw, steps)
    assert steps == []


def test_a_nan_loss_stops_training_and_exports_nothing(doc_dataset, tmp_path, tiny_run):
    from kdcache.student_train.module import NonFiniteLossError

    raw = tiny_run([doc_dataset], tmp_path / "run", steps=4, checkpoint_every=100)
    raw["defaults"]["optim"]["lr"] = 1e30  # the first update blows every weight up
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the loss is not finite .* on windows"):
        _run(raw)
    assert not os.path.exists(tmp_path / "run" / "s1" / "hf")
    assert not os.path.exists(tmp_path / "run" / "s1" / "summary.json")


class _Killed(RuntimeError):
    pass


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(doc_dataset, tmp_path,
                                                                     tiny_run, caplog):
    import lightning.pytorch as pl

    from kdcache.student_train.stages import TrainConfigError, parse_run, run

    class KillAtStep3(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:
                raise _Killed("killed")

    raw = tiny_run([doc_dataset], tmp_path / "run", steps=4, checkpoint_every=2)
    with pytest.raises(_Killed):
        run(parse_run(raw), callbacks=[KillAtStep3()])
    ckpts = tmp_path / "run" / "s1" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "step000002.ckpt"]
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="kdcache.train"):
        summary, = run(parse_run(raw))
    assert summary["resumed_from"].endswith("step000002.ckpt") and summary["steps"] == 4
    assert "last.ckpt is unreadable" in caplog.text

    # nothing intact left: a clear error, not a traceback from inside torch.load
    for name in os.listdir(ckpts):
        (ckpts / name).write_bytes(b"PK\x03\x04 truncated")
    os.remove(tmp_path / "run" / "s1" / "summary.json")
    with pytest.raises(TrainConfigError, match="cannot resume: .*--no-resume"):
        run(parse_run(raw))


def test_the_progress_bar_counts_steps_on_stderr(doc_dataset, tmp_path, tiny_run, capfd):
    raw = tiny_run([doc_dataset], tmp_path / "run", steps=3, progress_bar=True)
    _run(raw)
    out, err = capfd.readouterr()
    assert "Epoch" not in out + err and "train s1" not in out
    assert "train s1" in err and "3/3" in err


def test_a_foreign_rehashed_shard_is_refused_before_the_first_step(tmp_path, tiny_run):
    """formats' preflight (every shard against the manifest) runs before training starts."""
    import shutil

    from kdcache.errors import FormatError
    from kdcache.formats.synthetic import write_synthetic_dataset
    from tests.formats.fuzz_shards import rehash

    common = dict(windows=WINDOWS, window=WINDOW, vocab_size=256, windows_per_shard=2,
                  doc_len=(8, 80))
    write_synthetic_dataset(tmp_path / "ds", k=4, **common)
    write_synthetic_dataset(tmp_path / "other", k=8, seed=1, **common)
    shard = "shards/shard-00001.arrow"
    shutil.copyfile(tmp_path / "other" / shard, tmp_path / "ds" / shard)
    rehash(tmp_path / "ds", shard)
    steps: list = []
    with pytest.raises(FormatError, match="pre-training check"):
        _run(tiny_run([str(tmp_path / "ds")], tmp_path / "run", steps=1), steps)
    assert steps == []
