"""One packed window with its teacher targets: what the writer takes and the reader gives back.

Row semantics (FORMAT.md): a window of n tokens carries n target rows; row i is the teacher's
distribution for token i+1 given tokens up to i. `valid[i]` is False for rows with no target: the
window's last token always, and in document-masked modes each document's last token (its EOS):
`kdcache.formats.packing.default_valid`. Invalid rows hold ids -1 and log-probs -inf (weights 0 for sampled targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass
class WindowRecord:
    """Writer input, numpy arrays. `ids`/`values` cover all n rows; rows where `valid` is False
    are ignored. `doc_offsets` are cu_seqlens: [0, end_0, end_1, ..., n]."""

    window_index: int
    tokens: np.ndarray  # int [n]
    doc_offsets: np.ndarray  # int [d+1], starts at 0, ends at n, strictly increasing
    valid: np.ndarray  # bool [n]
    ids: np.ndarray  # int [n, k]
    values: np.ndarray  # float32 [n, k]: log-probs (topk) or weights (sampled)
    doc_ids: np.ndarray | None = None  # int64 [d]: source document index of each segment
    doc_pieces: np.ndarray | None = None  # int32 [d]: piece number of a split document (0 = first)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Window:
    """Reader output, torch tensors (int32 ids, float32 values)."""

    window_index: int
    tokens: "torch.Tensor"  # int32 [n]
    doc_offsets: "torch.Tensor"  # int32 [d+1]
    valid: "torch.Tensor"  # bool [n]
    ids: "torch.Tensor"  # int32 [n, k], -1 where invalid or padded
    logprobs: "torch.Tensor | None" = None  # float32 [n, k] for topk targets, -inf where invalid
    weights: "torch.Tensor | None" = None  # float32 [n, k] for sampled targets, 0 where invalid
    doc_ids: "torch.Tensor | None" = None  # int64 [d]
    doc_pieces: "torch.Tensor | None" = None  # int32 [d]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def to_record(self) -> WindowRecord:
        """The window as writer input (numpy views), e.g. to re-check it with validate_window."""
        values = self.logprobs if self.logprobs is not None else self.weights
        return WindowRecord(
            window_index=self.window_index, tokens=self.tokens.numpy(),
            doc_offsets=self.doc_offsets.numpy(), valid=self.valid.numpy(),
            ids=self.ids.numpy(), values=values.numpy(),
            doc_ids=None if self.doc_ids is None else self.doc_ids.numpy(),
            doc_pieces=None if self.doc_pieces is None else self.doc_pieces.numpy())

