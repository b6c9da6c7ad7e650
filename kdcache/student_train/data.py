"""Windows from logit datasets to training batches: order, sharding, cutting, resume.

Order. All windows of all datasets form one list of N entries. Epoch e visits them in the
permutation drawn from PCG64([seed, e]). A global step takes G = batch_windows x world_size
consecutive entries of that permutation; rank r takes its `batch_windows` slice of them. The
resume state is (seed, epoch, windows consumed in the epoch), counted over all ranks: it does not
depend on the number of DataLoader workers or on the world size, so a run resumed on another
number of ranks continues the same sequence of windows (only their grouping into steps changes).
An epoch has floor((N - start) / G) steps; the remainder is skipped (every rank must take the
same number of steps under DDP).

Workers. Within a rank, worker w builds the batches of steps w, w+W, ...; the DataLoader
interleaves workers round-robin, so batches arrive in step order whatever W is.

Cutting (stage 1 at 2,048 from longer windows). Only `document`-mode data may be cut: there each
document was run on its own with positions from 0, so whole documents can be regrouped freely. A
document longer than the cut keeps its first `window` tokens (a causal teacher's targets for a
prefix depend on the prefix only) and the rest is dropped and counted. In `causal` data the
teacher attended across documents, and in `document-global` data it saw positions counted over
the whole window: a cut would teach targets made under context the student no longer has, so it
is refused (make a separate dump at the shorter window).

A batch (dict of tensors; pinned when training on CUDA):
  tokens [R, L] int64, seg_ids [R, L] int32 (document index, -1 padding), target_ids [R, L, k]
  int32 (-1 where no target), target_logprobs [R, L, k] float32 (log-probs, or log-weights for
  sampled targets; -inf where no target), labels [R, L] int64 (next token; -100 where no target),
  and counters: epoch, consumed_after, epoch_done, n_tokens, n_target_rows, n_dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np
import torch

from kdcache.errors import ConfigMismatchError, KdcacheError, TargetValidationError
from kdcache.formats.reader import open_dataset
from kdcache.formats.validate import validate_window
from kdcache.formats.verify import preflight

IGNORE_INDEX = -100
log = logging.getLogger("kdcache.train")


@dataclass
class DataConfig:
    paths: list[str]
    window: int | None = None  # train window; None = the dataset's windows as they are
    batch_windows: int = 1  # source windows per rank per step
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool | None = None  # None: pin when training on CUDA
    verify_hashes: bool = True
    holdout_windows: int = 0  # the last N windows (of all datasets, in order) are never trained on


def trained_windows(n_windows: int, config: DataConfig) -> int:
    """How many windows training draws from: all but the last `holdout_windows`."""
    holdout = config.holdout_windows
    if not 0 <= holdout < n_windows:
        raise ConfigMismatchError(
            f"{config.paths}: holdout_windows={holdout} must be in [0, {n_windows}) "
            f"(these datasets hold {n_windows} windows)")
    return n_windows - holdout


@dataclass
class DataState:
    """What a checkpoint stores to continue the data order exactly."""

    seed: int
    epoch: int = 0
    consumed: int = 0  # windows consumed in this epoch, over all ranks

    def as_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of window indices visited in `epoch`."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_windows)


def rank_step_windows(order: np.ndarray, start: int, step: int, rank: int, world_size: int,
                      batch_windows: int) -> np.ndarray:
    """Entries of `order` that `rank` trains on at `step` steps after position `start`."""
    first = start + step * batch_windows * world_size + rank * batch_windows
    return order[first:first + batch_windows]


def steps_in_epoch(n_windows: int, start: int, world_size: int, batch_windows: int) -> int:
    return max(0, (n_windows - start) // (batch_windows * world_size))


def planned_windows(n_windows: int, state: DataState, steps: int | None,
                    global_batch: int) -> np.ndarray:
    """Sorted distinct window indices the next `steps` global steps train on (None: all)."""
    if steps is None or steps * global_batch >= n_windows:
        return np.arange(n_windows)
    picked: list[np.ndarray] = []
    epoch, start, left = state.epoch, state.consumed, steps
    while left > 0:
        take = min(left, steps_in_epoch(n_windows, start, 1, global_batch))
        if take == 0:
            break
        order = epoch_order(n_windows, state.seed, epoch)
        picked.append(order[start:start + take * global_batch])
        left -= take
        epoch, start = epoch + 1, 0
    return np.unique(np.concatenate(picked)) if picked else np.arange(0)


def check_student_ids(ids: np.ndarray, tokens: np.ndarray, limit: int | None, where: str,
                      window_index: int) -> None:
    """No silent truncation: a token or target id the student has no row for is an error."""
    if limit is None:
        return
    bad = (ids.max(axis=1, initial=-1) >= limit) | (tokens >= limit)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        top = int(max(ids[row].max(initial=-1), tokens[row]))
        raise TargetValidationError(
            f"{where}: window {window_index} row {row} holds token/target id {top}, but the "
            f"student's vocabulary has {limit} rows; refusing to drop or clamp it")


# ---------------------------------------------------------------------------------------------
# Windows -> samples
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One training row before padding (numpy)."""

    tokens: np.ndarray  # [n]
    seg_ids: np.ndarray  # [n]
    labels: np.ndarray  # [n]
    ids: np.ndarray  # [n, k]
    logprobs: np.ndarray  # [n, k]


def window_to_sample(window, kind: str) -> Sample:
    """A window's arrays as a training row (no copies of the [n, k] targets for top-k)."""
    tokens = window.tokens.numpy().astype(np.int64)
    offsets = window.doc_offsets.numpy().astype(np.int64)
    valid = window.valid.numpy()
    seg_ids = np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))
    labels = np.full(tokens.shape[0], IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[~valid] = IGNORE_INDEX
    ids = window.ids.numpy()  # int32, -1 where no target
    if kind == "topk":
        logprobs = window.logprobs.numpy()
    else:  # sampled weights w -> log w (0 -> -inf): the loss treats both as a sparse target
        with np.errstate(divide="ignore"):
            logprobs = np.log(window.weights.numpy()).astype(np.float32)
    return Sample(tokens, seg_ids, labels, ids, logprobs)


Layout = list[tuple[int, int]]  # one training row: (start, end) pieces of a sample, in order


def cut_layout(offsets: np.ndarray, length: int) -> tuple[list[Layout], int]:
    """Regroup whole documents into rows of at most `length` tokens (document-mode data only).

    Returns each row's pieces and the number of tokens dropped (tails of documents longer than
    `length`, which keep their first `length` tokens).
    """
    rows: list[Layout] = []
    dropped = 0
    pieces: Layout = []
    used = 0
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        size = end - start
        if size > length:
            dropped += size - length
            end, size = start + length, length
        if used + size > length:
            rows.append(pieces)
            pieces, used = [], 0
        pieces.append((start, end))
        used += size
    if pieces:
        rows.append(pieces)
    return rows, dropped


def pad_rows(rows: list[tuple[Sample, Layout]], length: int) -> dict[str, torch.Tensor]:
    """Copy each row's pieces into [R, length] batch arrays, padding the rest."""
    n_rows = len(rows)
    k = max(sample.ids.shape[1] for sample, _ in rows)
    if n_rows == 1 and rows[0][1] == [(0, length)] and rows[0][0].tokens.shape[0] == length:
        sample = rows[0][0]  # one whole window: no copy at all
        return {"tokens": torch.from_numpy(sample.tokens)[None],
                "seg_ids": torch.from_numpy(sample.seg_ids)[None],
                "labels": torch.from_numpy(sample.labels)[None],
                "target_ids": torch.from_numpy(sample.ids)[None],
                "target_logprobs": torch.from_numpy(sample.logprobs)[None]}
    tokens = np.zeros((n_rows, length), dtype=np.int64)
    seg_ids = np.full((n_rows, length), -1, dtype=np.int32)
    labels = np.full((n_rows, length), IGNORE_INDEX, dtype=np.int64)
    ids = np.full((n_rows, length, k), -1, dtype=np.int32)
    logprobs = np.full((n_rows, length, k), -np.inf, dtype=np.float32)
    for i, (sample, layout) in enumerate(rows):
        kr = sample.ids.shape[1]
        at = 0
        for j, (start, end) in enumerate(layout):
            n = end - start
            tokens[i, at:at + n] = sample.tokens[start:end]
            seg_ids[i, at:at + n] = j
            labels[i, at:at + n] = sample.labels[start:end]
            ids[i, at:at + n, :kr] = sample.ids[start:end]
            logprobs[i, at:at + n, :kr] = sample.logprobs[start:end]
            at += n
    return {"tokens": torch.from_numpy(tokens), "seg_ids": torch.from_numpy(seg_ids),
            "labels": torch.from_numpy(labels), "target_ids": torch.from_numpy(ids),
            "target_logprobs": torch.from_numpy(logprobs)}


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

def target_rows(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positions with a teacher target and a next token (labels != IGNORE_INDEX), flattened:
    (hidden [n, d], target_ids [n, k], target_logprobs [n, k], labels [n]). One device -> host
    read (the row count) serves all four selections."""
    labels = batch["labels"].reshape(-1)
    index = (labels != IGNORE_INDEX).nonzero().squeeze(1)

    def rows(t: torch.Tensor, lead: int) -> torch.Tensor:
        return t.reshape(-1, *t.shape[lead:]).index_select(0, index)

    return (rows(hidden, 2), rows(batch["target_ids"], 2), rows(batch["target_logprobs"], 2),
            labels.index_select(0, index))


class DatasetSet:
    """Several logit datasets seen as one list of windows; checks that they agree."""

    def __init__(self, paths: list[str], verify_hashes: bool = True) -> None:
        if not paths:
            raise KdcacheError("data.paths is empty: give at least one dataset")
        self.paths = list(paths)
        # Random window order jumps between shards: keep them all open (memory-mapped), so each
        # shard is opened and hash-checked once per process, not on every revisit.
        self.datasets = [open_dataset(p, verify_hashes=verify_hashes, max_open_shards=4096)
                         for p in self.paths]
        first = self.datasets[0].header
        for path, ds in zip(self.paths[1:], self.datasets[1:]):
            h = ds.header
            for name, a, b in (("packing mode", first.packing.get("mode"), h.packing.get("mode")),
                               ("target kind", first.kind, h.kind),
                               ("teacher vocab_size", first.vocab_size, h.vocab_size),
                               ("temperature", first.temperature, h.temperature)):
                if a != b:
                    raise ConfigMismatchError(
                        f"{path}: {name} {b!r} differs from {self.paths[0]}'s {a!r}; datasets "
                        "trained together must agree")
        self.header = first
        sizes = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def mode(self) -> str:
        return self.header.packing["mode"]

    @property
    def window(self) -> int:
        return int(self.header.packing["window"])

    def window_at(self, index: int):
        d = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.paths[d], self.datasets[d][index - int(self.starts[d])]


def check_cut(mode: str, dataset_window: int, window: int | None, where: str) -> int | None:
    """The cut length to apply, or None; refuses cuts the teacher's context does not allow."""
    if window is None or window == dataset_window:
        return None
    if window > dataset_window:
        raise ConfigMismatchError(f"{where}: windows of {dataset_window} tokens cannot be trained "
                                  f"at window {window} (longer than the data)")
    if mode != "document":
        raise ConfigMismatchError(
            f"{where}: packed in mode {mode!r} at {dataset_window} tokens; cutting it to {window}-"
            "token windows would train on targets the teacher made with context (or positions) "
            f"the cut removes. Only 'document'-mode data can be cut; a separate {window}-token "
            "dump is needed for this stage.")
    return window


class WindowBatches(torch.utils.data.IterableDataset):
    """This rank's batches for one epoch, from the state at the time `iter()` is called."""

    def __init__(self, config: DataConfig, state: DataState, rank: int, world_size: int,
                 student_vocab_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.state = state  # shared with the DataModule: read when an epoch's iterator starts
        self.rank, self.world_size = rank, world_size
        self.student_vocab_size = student_vocab_size
        self._data: DatasetSet | None = None

    @property
    def data(self) -> DatasetSet:
        if self._data is None:
            self._data = DatasetSet(self.config.paths, self.config.verify_hashes)
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers reopen the datasets (open files and codecs do not cross processes).
        return {**self.__dict__, "_data": None}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        data = self.data
        n, b = trained_windows(len(data), self.config), self.config.batch_windows
        epoch, start = self.state.epoch, self.state.consumed
        order = epoch_order(n, self.state.seed, epoch)
        n_steps = steps_in_epoch(n, start, self.world_size, b)
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        cut = check_cut(data.mode, data.window, self.config.window, data.paths[0])
        for step in range(worker, n_steps, n_workers):
            picks = rank_step_windows(order, start, step, self.rank, self.world_size, b)
            batch = self.build_batch(data, picks, cut)
            consumed_after = start + (step + 1) * b * self.world_size
            batch.update(epoch=epoch, consumed_after=consumed_after,
                         epoch_done=int(step == n_steps - 1))
            yield batch

    def build_batch(self, data: DatasetSet, picks: np.ndarray, cut: int | None) -> dict:
        rows: list[tuple[Sample, Layout]] = []
        dropped = 0
        for index in picks.tolist():
            path, window = data.window_at(index)
            sample = window_to_sample(window, data.header.kind)
            check_student_ids(sample.ids, sample.tokens, self.student_vocab_size, path,
                              window.window_index)
            if cut is None:
                rows.append((sample, [(0, sample.tokens.shape[0])]))
            else:
                layouts, lost = cut_layout(window.doc_offsets.numpy().astype(np.int64), cut)
                rows.extend((sample, layout) for layout in layouts)
                dropped += lost
        # Every batch of a stage has the window's length (windows of whole documents are often a
        # little shorter): one static shape, so compiled attention (FlexAttention on CUDA) builds
        # one kernel per stage instead of one per length, which after torch.compile's recompile
        # limit fell back to the dense T x T implementation (out of memory at 16k).
        length = cut or max(data.window, max(sample.tokens.shape[0] for sample, _ in rows))
        batch = pad_rows(rows, length)
        batch["n_tokens"] = int(sum(e - s for _, layout in rows for s, e in layout))
        batch["n_target_rows"] = int((batch["labels"] != IGNORE_INDEX).sum())
        batch["n_dropped"] = dropped
        batch["windows"] = torch.as_tensor(picks, dtype=torch.int64)  # named by step errors
        return batch


class WindowDataModule(pl.LightningDataModule):
    """LightningDataModule over one or more logit datasets, with resumable order state."""

    def __init__(self, config: DataConfig, student_vocab_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.student_vocab_size = student_vocab_size
        self.state = DataState(seed=config.seed)
        self._data: DatasetSet | None = None

    @property
    def data(self) -> DatasetSet:
        if self._data is None:
            self._data = DatasetSet(self.config.paths, self.config.verify_hashes)
            check_cut(self._data.mode, self._data.window, self.config.window,
                      self._data.paths[0])
        return self._data

    @property
    def header(self):
        return self.data.header

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn sends the module to new processes: they reopen the datasets.
        return {**self.__dict__, "_data": None}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rank, world = 0, 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
        _ = self.data  # open and check in the main process, before workers start
        # Called after a resumed run's state is restored: check what the coming steps use.
        steps = None
        if trainer is not None and trainer.max_steps > 0:
            steps = max(0, trainer.max_steps - trainer.global_step)
        self.preflight(steps, world)
        batches = WindowBatches(self.config, self.state, rank, world, self.student_vocab_size)
        pin = self.config.pin_memory
        if pin is None:
            pin = torch.cuda.is_available()
        return torch.utils.data.DataLoader(
            batches, batch_size=None, num_workers=self.config.num_workers, pin_memory=pin,
            persistent_workers=False, prefetch_factor=2 if self.config.num_workers else None)

    def preflight(self, steps: int | None = None, world_size: int = 1) -> int:
        """Before the first step, check every shard against the manifest (formats' preflight:
        duplicated entries, foreign shards), then every window the next `steps` steps train on
        (all with None) as the writer would (finite, normalised, in-range targets; FORMAT.md's valid rows)
        and against the student's rows; returns the number of windows checked."""
        import time

        data = self.data
        started = time.perf_counter()
        for dataset in data.datasets:  # every shard's footer and window range, no decoding
            preflight(dataset)
        indices = planned_windows(trained_windows(len(data), self.config), self.state, steps,
                                  self.config.batch_windows * world_size)
        for index in indices.tolist():
            path, window = data.window_at(index)
            record = window.to_record()
            validate_window(record, data.header, where=path)
            check_student_ids(record.ids, record.tokens, self.student_vocab_size, path,
                              record.window_index)
        log.info("checked the targets of %d windows before training (%.1f s)", len(indices),
                 time.perf_counter() - started)
        return len(indices)

    def mark_consumed(self, batch: dict[str, Any]) -> None:
        """Called once per training step with the step's batch (before any checkpoint)."""
        if int(batch["epoch_done"]):
            self.state.epoch = int(batch["epoch"]) + 1
            self.state.consumed = 0
        else:
            self.state.epoch = int(batch["epoch"])
            self.state.consumed = int(batch["consumed_after"])

    def state_dict(self) -> dict[str, Any]:
        return {**self.state.as_dict(), "n_windows": trained_windows(len(self.data), self.config)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n = trained_windows(len(self.data), self.config)
        if int(state_dict["n_windows"]) != n:
            raise ConfigMismatchError(
                f"{self.config.paths}: the checkpoint's data order covers "
                f"{state_dict['n_windows']} windows, these datasets train on {n} "
                f"({len(self.data)} held, holdout_windows={self.config.holdout_windows})")
        self.state.seed = int(state_dict["seed"])
        self.state.epoch = int(state_dict["epoch"])
        self.state.consumed = int(state_dict["consumed"])

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return steps_in_epoch(trained_windows(len(self.data), self.config), 0, world_size,
                              self.config.batch_windows)

