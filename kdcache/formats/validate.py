"""Checks on teacher targets before they are encoded: bad targets must never reach a shard.

Each failure raises TargetValidationError naming where (the shard being written), the window and
the first offending row, so that a dump can be fixed instead of silently training on garbage.
"""

from __future__ import annotations

import numpy as np

from kdcache.errors import TargetValidationError
from kdcache.formats.codecs.blocks import INLINE, BlockPool, split
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.packing import default_valid
from kdcache.formats.window import WindowRecord

# vLLM and HF compute log-softmax in fp32; allow rounding above 0 and in the descending order.
_LOGPROB_MAX = 1e-4
_ORDER_SLACK = 1e-5
_WEIGHT_SUM_TOL = 1e-3
_BLOCK_ROWS = 1024  # rows checked per block on a pool


def validate_window(rec: WindowRecord, header: DatasetHeader, *, where: str,
                    pool: BlockPool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check one window; return its valid rows' (ids int64 [m, k], values float32 [m, k]).
    With a `pool`, the row checks run on its threads in blocks of rows."""
    rows, fail = window_rows(rec, header, where=where)
    ids, values = np.asarray(rec.ids), np.asarray(rec.values)
    ids_v = np.empty((rows.size, ids.shape[1]), dtype=np.int64)
    vals_v = np.empty((rows.size, ids.shape[1]), dtype=np.float32)
    check = row_check(header)

    def block(ab: tuple[int, int]) -> TargetValidationError | None:
        a, b = ab
        ids_v[a:b] = ids[rows[a:b]]
        vals_v[a:b] = values[rows[a:b]]
        try:
            check(ids_v[a:b], vals_v[a:b], rows[a:b], header.vocab_size, fail)
        except TargetValidationError as exc:
            return exc
        return None

    # Row blocks on the encoder's threads; the first failing block's error is raised.
    blocks = split(rows.size, 2 * pool.workers, minimum=_BLOCK_ROWS) if pool else [(0, rows.size)]
    for exc in (pool or INLINE).map(block, blocks):
        if exc is not None:
            raise exc
    return ids_v, vals_v


def window_tag(rec: WindowRecord, where: str) -> str:
    """How a window's errors name it."""
    return f"{where}: window {rec.window_index}"


def failing_with(tag: str):
    """fail(msg): raises TargetValidationError naming `tag` (what the row checks call)."""
    def fail(msg: str) -> None:
        raise TargetValidationError(f"{tag}: {msg}")
    return fail


def row_check(header: DatasetHeader):
    """The per-row check of the dataset's kind: check(ids, values, rows, vocab, fail)."""
    return check_topk_rows if header.kind == "topk" else _check_sampled


def window_rows(rec: WindowRecord, header: DatasetHeader, *, where: str):
    """The checks of a window as a whole (tokens, documents, valid mask, target shapes), all
    but the per-row ones (`row_check`); returns (valid row indices int64, fail)."""
    fail = failing_with(window_tag(rec, where))

    tokens = np.asarray(rec.tokens)
    if tokens.ndim != 1 or tokens.shape[0] == 0:
        fail(f"tokens must be a non-empty 1-D array, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        fail(f"tokens must be integers, got {tokens.dtype}")
    n = tokens.shape[0]
    if tokens.min() < 0 or tokens.max() >= header.vocab_size:
        fail(f"token id out of range [0, {header.vocab_size}): min {tokens.min()}, max {tokens.max()}")
    window = header.packing.get("window")
    if window and n > window:
        fail(f"{n} tokens exceed the dataset's window of {window}")

    offsets = np.asarray(rec.doc_offsets)
    if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n \
            or np.any(np.diff(offsets) <= 0):
        fail(f"doc_offsets must rise strictly from 0 to n={n}, got {offsets[:8].tolist()}...")
    n_docs = offsets.shape[0] - 1
    for name in ("doc_ids", "doc_pieces"):
        arr = getattr(rec, name)
        if arr is not None and np.asarray(arr).shape != (n_docs,):
            fail(f"{name} must have one entry per document ({n_docs}), got shape {np.shape(arr)}")

    valid = np.asarray(rec.valid)
    if valid.dtype != np.bool_ or valid.shape != (n,):
        fail(f"valid must be bool of shape ({n},), got {valid.dtype} {valid.shape}")
    required_invalid = ~default_valid(n, offsets, header.packing["mode"])
    if np.any(valid & required_invalid):
        row = int(np.flatnonzero(valid & required_invalid)[0])
        fail(f"row {row} has no target in {header.packing['mode']!r} packing (last token of the "
             "window or of a document) but is marked valid")

    ids = np.asarray(rec.ids)
    values = np.asarray(rec.values)
    if ids.ndim != 2 or ids.shape[0] != n:
        fail(f"ids must have shape ({n}, k), got {ids.shape}")
    if ids.shape[1] != header.k:
        fail(f"wrong k: targets have {ids.shape[1]} entries per row, the dataset's k is {header.k}")
    if values.shape != ids.shape:
        fail(f"values shape {values.shape} does not match ids shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        fail(f"ids must be integers, got {ids.dtype}")

    return np.flatnonzero(valid), fail


def _first_row(mask: np.ndarray, rows: np.ndarray) -> int:
    return int(rows[np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]])


def _check_distinct(ids: np.ndarray, rows: np.ndarray, fail, ignore_negative: bool) -> None:
    if ids.shape[1] < 2 or ids.shape[0] == 0:
        return
    s = np.sort(ids, axis=1)
    dup = s[:, 1:] == s[:, :-1]
    if ignore_negative:
        dup &= s[:, 1:] >= 0
    if dup.any():
        fail(f"row {_first_row(dup, rows)}: an id appears twice in one row")


def check_topk_rows(ids, vals, rows, vocab, fail) -> None:
    """Top-k rows: ids in [0, vocab), distinct per row; finite log-probs <= 0, sorted descending,
    mass <= 1. `rows` maps each row to the index named in the message; `fail(msg)` raises."""
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        r = _first_row(bad, rows)
        fail(f"row {r}: id out of range [0, {vocab}): {ids[np.flatnonzero(bad.any(1))[0]].max()}")
    if not np.isfinite(vals).all():
        r = _first_row(~np.isfinite(vals), rows)
        fail(f"row {r}: log-prob is NaN or infinite (a top-k target needs finite log-probs)")
    if (vals > _LOGPROB_MAX).any():
        fail(f"row {_first_row(vals > _LOGPROB_MAX, rows)}: log-prob above 0 (not a log-probability)")
    if (np.diff(vals, axis=1) > _ORDER_SLACK).any():
        fail(f"row {_first_row(np.diff(vals, axis=1) > _ORDER_SLACK, rows)}: "
             "log-probs are not sorted in descending order")
    mass = np.exp(vals.astype(np.float64)).sum(axis=1)
    if (mass > 1 + _WEIGHT_SUM_TOL).any():
        fail(f"row {_first_row(mass > 1 + _WEIGHT_SUM_TOL, rows)}: top-k probabilities sum to more "
             "than 1 (log-probs must be normalised over the full vocabulary)")
    _check_distinct(ids, rows, fail, ignore_negative=False)


def _check_sampled(ids, weights, rows, vocab, fail) -> None:
    if ids.size == 0:
        return
    pad = ids < 0
    if ((ids < -1) | (ids >= vocab)).any():
        fail(f"row {_first_row((ids < -1) | (ids >= vocab), rows)}: id out of range [0, {vocab}) "
             "(-1 marks padding)")
    if (pad[:, :1]).any():
        fail(f"row {_first_row(pad[:, :1], rows)}: a sampled row needs at least one id")
    if (pad[:, :-1] & ~pad[:, 1:]).any():
        fail(f"row {_first_row(pad[:, :-1] & ~pad[:, 1:], rows)}: padding (-1) must come after "
             "all real ids")
    if not np.isfinite(weights).all() or (weights < 0).any():
        bad = ~np.isfinite(weights) | (weights < 0)
        fail(f"row {_first_row(bad, rows)}: weights must be finite and non-negative")
    if (weights[pad] != 0).any():
        fail(f"row {_first_row(pad & (weights != 0), rows)}: padded entries must have weight 0")
    sums = weights.astype(np.float64).sum(axis=1)
    off = np.abs(sums - 1) > _WEIGHT_SUM_TOL
    if off.any():
        fail(f"row {_first_row(off, rows)}: weights sum to {sums[off][0]:.6f}, not 1")
    _check_distinct(ids, rows, fail, ignore_negative=True)
