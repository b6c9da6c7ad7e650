"""The codec contract: how teacher targets of one window become bytes and back.

A codec sees only the *valid* rows of a window (rows with a target; FORMAT.md "Row semantics"),
as dense arrays:

- kind "topk":    ids int [m, k] (distinct, in [0, vocab)), values float32 [m, k] = full-vocabulary
                  log-probs at temperature 1, each row sorted descending.
- kind "sampled": ids int [m, k] with -1 padding at the end of a row, values float32 [m, k] =
                  weights (>= 0, summing to 1 over the row's real ids, 0 at padding).

The writer validates targets before calling `encode` (kdcache.formats.validate), so a codec may
assume well-formed input. `decode` returns ids int32 [m, k] and values float32 [m, k] in the same
conventions (topk rows descending; sampled rows padded with -1 / 0).

A codec may use a dataset-level table (for example a frequency ranking of ids). A table is built
once, before the first shard is written, from what a streaming writer knows at that point
(`build_table`), stored as `codec/table.bin` in the dataset with its xxh3 in the manifest, and
handed to every codec instance that writes or reads the dataset. Its bytes count towards the
dataset's bytes per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from kdcache.formats.codecs.blocks import BlockPool

TARGET_KINDS = ("topk", "sampled")


class TargetCodec(ABC):
    """Encodes the valid target rows of one window into one self-delimiting blob."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = TARGET_KINDS
    lossless: ClassVar[bool] = False

    def __init__(self, *, kind: str, k: int, vocab_size: int, table: bytes | None = None,
                 **params: Any) -> None:
        if kind not in self.kinds:
            raise ValueError(f"codec {self.name!r} does not support target kind {kind!r}")
        if not 0 < vocab_size < 2**31:
            raise ValueError(f"vocab_size must be in [1, 2^31), got {vocab_size}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.kind = kind
        self.k = k
        self.vocab_size = vocab_size
        self.table = table
        self.params = dict(params)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable parameters, recorded in the manifest (the table is stored apart)."""
        return dict(self.params)

    @classmethod
    def build_table(cls, *, vocab_size: int, token_counts: np.ndarray | None = None,
                    sample_ids: np.ndarray | None = None) -> bytes | None:
        """A dataset-level table from what is known before the first shard, or None."""
        return None

    @abstractmethod
    def encode(self, ids: np.ndarray, values: np.ndarray, *,
               pool: "BlockPool | None" = None) -> bytes:
        """Encode m valid rows ([m, k] ids and values) into bytes. `pool`: threads the codec
        may spread this one window's work over (blocks.py); the bytes must not depend on it."""

    @abstractmethod
    def decode(self, blob: bytes | memoryview, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode a blob of m rows into (ids int32 [m, k], values float32 [m, k])."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds every id below vocab_size."""
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)
