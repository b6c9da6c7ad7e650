"""Packing modes: the one home of what each mode means (FORMAT.md, "packing").

A mode says how the teacher saw a packed window, so everything downstream must treat it the same
way: which rows carry a target (`default_valid`), which requests the teacher runs and from which
position (`request_segments`), which attention and positions a student or an evaluator must use
to see what the teacher saw (`MODES[mode].attention / .positions`), and how the dataset card
describes it (`MODES[mode].card_text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackingMode:
    name: str
    attention: str  # "causal": across documents; "document": within each document only
    positions: str  # "global": counted over the window; "reset": from 0 in every document
    card_text: str  # the dataset card's sentence for it


MODES: dict[str, PackingMode] = {m.name: m for m in (
    PackingMode("causal", "causal", "global",
                "windows were run as one sequence: attention crosses document boundaries and "
                "positions count over the whole window"),
    PackingMode("document", "document", "reset",
                "each document was run on its own: no cross-document attention, positions start "
                "at 0 in every document"),
    PackingMode("document-global", "document", "global",
                "document-masked attention with positions counted over the whole window "
                "(the seed paper's setting)"),
)}
PACKING_MODES = tuple(MODES)  # also the `--mode` choices


def default_valid(n: int, doc_offsets: np.ndarray, mode: str) -> np.ndarray:
    """The `valid` flags FORMAT.md prescribes for a packing mode: the window's last row, and in
    document-masked modes each document's last row (its EOS), have no target."""
    if mode not in MODES:
        raise ValueError(f"unknown packing mode {mode!r}; expected one of {PACKING_MODES}")
    valid = np.ones(n, dtype=bool)
    if n:
        valid[-1] = False
    if MODES[mode].attention == "document":
        ends = np.asarray(doc_offsets[1:], dtype=np.int64) - 1
        valid[ends[(ends >= 0) & (ends < n)]] = False
    return valid


def request_segments(n: int, doc_offsets, mode: str) -> list[tuple[int, int, int]]:
    """(start, end, first_position) of each separately run request of an n-token window.

    causal: the whole window from position 0. document: each document from position 0.
    document-global: each document from its offset in the window (a document mask with global
    positions is exactly a per-document run whose positions start at the document's offset).
    """
    spec = MODES[mode]
    if spec.attention == "causal":
        return [(0, n, 0)]
    offs = [int(o) for o in doc_offsets]
    return [(s, e, s if spec.positions == "global" else 0) for s, e in zip(offs[:-1], offs[1:])]
