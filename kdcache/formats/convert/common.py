"""What every converter shares: making foreign top-k rows valid kdcache targets (and counting what
that changed), packing converted documents into windows, and writing the dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from kdcache.formats.packing import default_valid
from kdcache.formats.window import WindowRecord

# What kdcache's writer accepts (formats/validate.py); repaired rows land well inside it.
_LOGPROB_MAX = 0.0


@dataclass
class RepairCounts:
    """Rows a conversion had to change to make them kdcache top-k targets (FORMAT.md)."""

    rows: int = 0  # rows with targets seen
    clamped: int = 0  # a log-prob above 0 (an approximation's overshoot) set to 0
    reordered: int = 0  # entries not in descending order, sorted (ids move with their values)
    renormalised: int = 0  # top-k mass above 1, scaled down to 1
    dropped: int = 0  # rows without k distinct ids and finite log-probs: stored without a target
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "clamped": self.clamped, "reordered": self.reordered,
                "renormalised": self.renormalised, "dropped": self.dropped, **self.extra}


def repair_topk_rows(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int,
                     counts: RepairCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 [m, k], log-probs float32 [m, k], keep bool [m]): rows sorted descending,
    clamped to <= 0, with mass <= 1; `keep` is False for rows that cannot be a target (ids out of
    range or repeated, non-finite values)."""
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    m = ids.shape[0]
    counts.rows += m
    if m == 0:
        return ids, lp.astype(np.float32), np.zeros(0, dtype=bool)
    keep = np.isfinite(lp).all(axis=1) & ((ids >= 0) & (ids < vocab_size)).all(axis=1)
    s = np.sort(ids, axis=1)
    keep &= ~(s[:, 1:] == s[:, :-1]).any(axis=1)
    lp = np.where(np.isfinite(lp), lp, -1e4)  # dropped rows only; keeps the arithmetic quiet
    over = lp > _LOGPROB_MAX
    counts.clamped += int((over.any(axis=1) & keep).sum())
    lp = np.minimum(lp, _LOGPROB_MAX)
    unsorted = (np.diff(lp, axis=1) > 0).any(axis=1)
    counts.reordered += int((unsorted & keep).sum())
    if unsorted.any():
        order = np.argsort(-lp, axis=1, kind="stable")
        lp = np.take_along_axis(lp, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
    mass = np.exp(lp).sum(axis=1)
    heavy = mass > 1.0
    counts.renormalised += int((heavy & keep).sum())
    lp[heavy] -= np.log(mass[heavy])[:, None]
    counts.dropped += int((~keep).sum())
    return ids, np.minimum(lp, 0.0).astype(np.float32), keep


@dataclass
class Document:
    """One converted document: its tokens and the targets of its first rows (row i: the
    teacher's distribution for token i+1); `keep` False rows are stored without a target."""

    doc_id: int
    tokens: np.ndarray  # int [n]
    ids: np.ndarray  # int64 [m, k], m <= n - 1
    logprobs: np.ndarray  # float32 [m, k]
    keep: np.ndarray  # bool [m]


def pack_documents(docs: Iterable[Document], *, window: int, k: int,
                   mode: str = "document") -> Iterator[WindowRecord]:
    """Next-fit: consecutive documents share a window until the next does not fit. In document
    mode each document keeps exactly the targets it was computed with (run on its own)."""
    batch: list[Document] = []
    used = 0
    index = 0

    def emit() -> WindowRecord:
        n = sum(d.tokens.shape[0] for d in batch)
        offsets = np.concatenate([[0], np.cumsum([d.tokens.shape[0] for d in batch])])
        tokens = np.concatenate([d.tokens for d in batch]).astype(np.int64)
        ids = np.full((n, k), -1, dtype=np.int64)
        values = np.full((n, k), -np.inf, dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        for d, start in zip(batch, offsets[:-1]):
            m = d.ids.shape[0]
            ids[start:start + m] = d.ids
            values[start:start + m] = d.logprobs
            valid[start:start + m] = d.keep
        valid &= default_valid(n, offsets, mode)
        return WindowRecord(window_index=index, tokens=tokens, doc_offsets=offsets, valid=valid,
                            ids=ids, values=values,
                            doc_ids=np.array([d.doc_id for d in batch], dtype=np.int64),
                            doc_pieces=np.zeros(len(batch), dtype=np.int32))

    for doc in docs:
        n = doc.tokens.shape[0]
        if batch and used + n > window:
            yield emit()
            index += 1
            batch, used = [], 0
        batch.append(doc)
        used += n
    if batch:
        yield emit()


def token_bar(show: bool):
    """A tqdm bar counting converted tokens (None when quiet)."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(desc="kdcache convert", unit="tok", unit_scale=True, dynamic_ncols=True)


def conversion_summary(out: str, fmt: str, manifest: dict[str, Any], *, documents: int,
                       tokens: int, started: float, counts: RepairCounts,
                       codec: str) -> dict[str, Any]:
    """What `kdcache convert` prints: sizes, speed since `started` (perf_counter), changes."""
    seconds = time.perf_counter() - started
    return {"out": out, "format": fmt, "windows": manifest["totals"]["windows"],
            "documents": documents, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
            "rows_changed": counts.as_dict(), "codec": codec}
