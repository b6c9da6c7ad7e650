"""Window order, rank/worker sharding, resume state, cutting and batch contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.errors import ConfigMismatchError, TargetValidationError
from kdcache.formats.reader import open_dataset
from kdcache.student_train.data import (IGNORE_INDEX, DataConfig, DataState, WindowBatches,
                                        WindowDataModule, epoch_order, rank_step_windows,
                                        steps_in_epoch, target_rows)


def _consume(n, seed, epoch, start, world, b, steps):
    """Windows each step hands out, over all ranks, in rank order."""
    order = epoch_order(n, seed, epoch)
    out = []
    for step in range(steps):
        for rank in range(world):
            out.extend(rank_step_windows(order, start, step, rank, world, b).tolist())
    return out


def test_epoch_order_is_seeded_and_changes_per_epoch():
    a, b = epoch_order(50, 3, 0), epoch_order(50, 3, 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, 3, 1))
    assert not np.array_equal(a, epoch_order(50, 4, 0))


@pytest.mark.parametrize("world_before,world_after", [(2, 3), (4, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_sequence(world_before, world_after):
    n, seed, b = 40, 11, 2
    first_steps = 3
    head = _consume(n, seed, 0, 0, world_before, b, first_steps)
    consumed = first_steps * b * world_before  # what DataState stores
    rest_steps = steps_in_epoch(n, consumed, world_after, b)
    tail = _consume(n, seed, 0, consumed, world_after, b, rest_steps)
    seen = head + tail
    assert len(set(seen)) == len(seen)  # no window twice
    order = epoch_order(n, seed, 0).tolist()
    assert seen == order[:len(seen)]  # the same global sequence as an uninterrupted run
    assert n - len(seen) < b * world_after  # only the last partial step is skipped


def _batches(path, workers=0, rank=0, world=1, state=None, **config):
    cfg = DataConfig(paths=[path], num_workers=workers, **config)
    ds = WindowBatches(cfg, state or DataState(seed=cfg.seed), rank, world, 256)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return list(loader)


def test_batches_do_not_depend_on_worker_count(doc_dataset):
    plain = _batches(doc_dataset, workers=0, batch_windows=2, seed=5)
    forked = _batches(doc_dataset, workers=2, batch_windows=2, seed=5)
    assert len(plain) == len(forked) == 6
    for a, b in zip(plain, forked):
        assert a["consumed_after"] == b["consumed_after"]
        for key in ("tokens", "seg_ids", "labels", "target_ids", "target_logprobs"):
            assert torch.equal(a[key], b[key]), key


def test_ranks_split_each_step(doc_dataset):
    r0 = _batches(doc_dataset, rank=0, world=2, seed=1)
    r1 = _batches(doc_dataset, rank=1, world=2, seed=1)
    assert len(r0) == len(r1) == 6
    assert [b["consumed_after"] for b in r0] == [2, 4, 6, 8, 10, 12]
    assert r0[-1]["epoch_done"] == 1
    assert not torch.equal(r0[0]["tokens"], r1[0]["tokens"])


def test_batch_rows_follow_the_row_semantics(doc_dataset):
    ds = open_dataset(doc_dataset)
    order = epoch_order(len(ds), 0, 0)
    batch = _batches(doc_dataset, seed=0)[0]
    window = ds[int(order[0])]
    tokens, valid = window.tokens.long(), window.valid
    assert torch.equal(batch["tokens"][0], tokens)
    labels = batch["labels"][0]
    # row i predicts token i+1; rows without a teacher target are ignored
    assert torch.equal(labels[valid], tokens[1:][valid[:-1]])
    assert (labels[~valid] == IGNORE_INDEX).all()
    assert torch.equal(batch["target_ids"][0][valid], window.ids[valid].long())
    offsets = window.doc_offsets.long()
    assert batch["seg_ids"][0].tolist() == torch.repeat_interleave(
        torch.arange(len(offsets) - 1), offsets.diff()).tolist()


def test_cut_document_mode_at_document_boundaries(doc_dataset):
    ds = open_dataset(doc_dataset)
    order = epoch_order(len(ds), 0, 0)
    batch = _batches(doc_dataset, seed=0, window=48)[0]
    window = ds[int(order[0])]
    offsets = window.doc_offsets.tolist()
    docs = [window.tokens[s:e].tolist() for s, e in zip(offsets[:-1], offsets[1:])]
    rows = []
    for row_tokens, row_seg in zip(batch["tokens"], batch["seg_ids"]):
        for seg in row_seg.unique().tolist():
            if seg >= 0:
                rows.append(row_tokens[row_seg == seg].tolist())
    assert batch["tokens"].shape[1] == 48
    # every piece is a whole document, or the first 48 tokens of a longer one, in order
    assert rows == [d[:48] for d in docs]
    assert batch["n_dropped"] == sum(max(0, len(d) - 48) for d in docs)
    # a truncated document's last kept row still has its exact teacher target
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == batch["n_target_rows"]


@pytest.mark.parametrize("fixture", ["causal_dataset", "docglobal_dataset"])
def test_cut_is_refused_unless_document_mode(fixture, request):
    path = request.getfixturevalue(fixture)
    with pytest.raises(ConfigMismatchError, match="separate 64-token dump"):
        WindowDataModule(DataConfig(paths=[path], window=64)).train_dataloader()


def test_sampled_targets_become_log_weights(sampled_dataset):
    batch = _batches(sampled_dataset, seed=0)[0]
    lp = batch["target_logprobs"][0]
    rows = batch["labels"][0] != IGNORE_INDEX
    sums = torch.logsumexp(lp[rows], dim=-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-5, rtol=0)
    assert (batch["target_ids"][0][lp == float("-inf")] == -1).all()


def test_ids_beyond_the_student_vocabulary_are_refused(doc_dataset):
    cfg = DataConfig(paths=[doc_dataset])
    ds = WindowBatches(cfg, DataState(seed=0), 0, 1, student_vocab_size=100)
    with pytest.raises(TargetValidationError, match="student's vocabulary has 100 rows"):
        next(iter(ds))


def test_datasets_that_disagree_are_refused(doc_dataset, causal_dataset):
    with pytest.raises(ConfigMismatchError, match="packing mode"):
        WindowDataModule(DataConfig(paths=[doc_dataset, causal_dataset])).train_dataloader()


def test_datamodule_state_round_trip(doc_dataset):
    dm = WindowDataModule(DataConfig(paths=[doc_dataset], seed=9))
    batch = next(iter(dm.train_dataloader()))
    dm.mark_consumed(batch)
    state = dm.state_dict()
    assert state == {"seed": 9, "epoch": 0, "consumed": 1, "n_windows": 12}
    other = WindowDataModule(DataConfig(paths=[doc_dataset], seed=0))
    other.load_state_dict(state)
    resumed = next(iter(other.train_dataloader()))
    full = list(dm.__class__(DataConfig(paths=[doc_dataset], seed=9)).train_dataloader())
    assert torch.equal(resumed["tokens"], full[1]["tokens"])


def test_holdout_windows_are_never_trained_on(doc_dataset):
    """holdout_windows=3: an epoch hands out exactly the first 9 of 12 windows, each once; the
    resume state counts the 9; a holdout that leaves nothing to train on is refused."""
    ds = open_dataset(doc_dataset)
    batches = _batches(doc_dataset, seed=4, holdout_windows=3)
    assert len(batches) == 9 and batches[-1]["epoch_done"] == 1
    trained = {tuple(b["tokens"][0].tolist()) for b in batches}
    held = {tuple(ds[i].tokens.tolist()) for i in range(9, 12)}
    assert trained == {tuple(ds[i].tokens.tolist()) for i in range(9)}
    assert not trained & held
    dm = WindowDataModule(DataConfig(paths=[doc_dataset], holdout_windows=3))
    assert dm.state_dict()["n_windows"] == 9 and dm.steps_per_epoch() == 9
    with pytest.raises(ConfigMismatchError, match="holdout_windows=12"):
        _batches(doc_dataset, holdout_windows=12)


def test_every_batch_has_the_window_length_whatever_its_windows_fill(tmp_path):
    """Windows of whole documents are often shorter than the window: batches are padded to
    the window all the same (one static shape per stage for compiled attention)."""
    from kdcache.formats.manifest import DatasetHeader
    from kdcache.formats.synthetic import synthetic_window
    from kdcache.formats.writer import DatasetWriter

    rng = np.random.default_rng(0)
    header = DatasetHeader(kind="topk", k=4, vocab_size=64, codec="raw",
                           packing={"window": 128, "mode": "document", "bos_id": 1, "eos_id": 2,
                                    "seed": 0},
                           teacher={"name": "synthetic", "config_hash": "s",
                                    "tokenizer_hash": "s"})
    root = str(tmp_path / "ds")
    with DatasetWriter(root, header, windows_per_shard=4) as writer:
        for i, n in enumerate((128, 101, 117, 90)):
            writer.add(synthetic_window(rng, i, n, 64, 4, doc_len=(8, 40)))
    batches = _batches(root, seed=0, batch_windows=2)
    assert len(batches) == 2
    for batch in batches:
        assert batch["tokens"].shape[1] == 128
        pad = batch["seg_ids"] < 0
        assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()


def test_target_rows_are_the_labelled_positions_in_order_with_their_gradient():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, 3] = labels[1, 0] = labels[1, 8] = IGNORE_INDEX
    batch = {"labels": labels, "target_ids": torch.randint(0, 50, (2, 9, 4), generator=g),
             "target_logprobs": torch.randn(2, 9, 4, generator=g)}
    hidden = torch.randn(2, 9, 5, generator=g, requires_grad=True)
    h, ids, lps, lab = target_rows(hidden, batch)
    keep = labels != IGNORE_INDEX
    assert torch.equal(h, hidden[keep]) and torch.equal(lab, labels[keep])
    assert torch.equal(ids, batch["target_ids"][keep])
    assert torch.equal(lps, batch["target_logprobs"][keep])
    h.sum().backward()
    assert torch.equal(hidden.grad, keep[..., None].expand_as(hidden).float())
