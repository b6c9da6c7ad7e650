"""Frequency ranking of token ids: a dataset-level table that makes common ids small numbers.

The ids a teacher puts in its top-k are far from uniform (punctuation, "the", frequent word
pieces appear in most rows), so coding an id's *rank* in a frequency ordering takes fewer bits
than coding the id. The table lists the ids seen in a sample (or in the corpus's token counts)
with their counts; rank r < n is the r-th id by (count descending, id ascending), and every id
the table does not hold follows in id order: rank n + (id minus the number of table ids below it).
So the table can be small (only ids seen) and still rank any vocabulary below 2^31, with no
vocabulary-sized array.

Serialised form (`to_bytes`), little-endian:

    b"KDRT" | u8 version=1 | u32 vocab_size | u32 n | u32 zstd_len | zstd(varint stream)

where the varint stream (LEB128) holds n gaps between sorted ids (first id, then id[i]-id[i-1])
followed by n counts. Counts are typically a few bytes, so a table costs about 1.5-3 bytes per
listed id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from kdcache.formats.codecs.varint import varint_decode, varint_encode

_MAGIC = b"KDRT"
_HEADER = struct.Struct("<4sBIII")
_DENSE_MAX_VOCAB = 2**24  # above this, ranks are found by binary search instead of a lookup array


@dataclass(frozen=True)
class RankTable:
    vocab_size: int
    ids_by_rank: np.ndarray  # int32 [n]: the table's ids, most frequent first
    sorted_ids: np.ndarray  # int64 [n]: the same ids ascending
    rank_of_sorted: np.ndarray  # int64 [n]: rank of sorted_ids[i]
    counts_sorted: np.ndarray  # int64 [n]: count of sorted_ids[i]

    @property
    def size(self) -> int:
        return int(self.ids_by_rank.shape[0])

    @classmethod
    def from_counts(cls, vocab_size: int, ids: np.ndarray, counts: np.ndarray) -> "RankTable":
        """Table of the given distinct ids (any order) with their positive counts."""
        ids = np.asarray(ids, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids, counts_sorted = ids[order], counts[order]
        if sorted_ids.size and (sorted_ids[0] < 0 or sorted_ids[-1] >= vocab_size
                                or np.any(np.diff(sorted_ids) <= 0) or counts_sorted.min() <= 0):
            raise ValueError("rank table: ids must be distinct, in [0, vocab) with positive counts")
        # Rank order: count descending, then id ascending (stable sort over ascending ids).
        by_rank = np.argsort(-counts_sorted, kind="stable")
        rank_of_sorted = np.empty_like(by_rank)
        rank_of_sorted[by_rank] = np.arange(by_rank.size)
        return cls(vocab_size, sorted_ids[by_rank].astype(np.int32), sorted_ids,
                   rank_of_sorted.astype(np.int64), counts_sorted)

    @classmethod
    def from_sample(cls, vocab_size: int, sample_ids: np.ndarray | None = None,
                    token_counts: np.ndarray | None = None) -> "RankTable":
        """Count the ids of a sample (preferred: it is what gets coded), else use token counts."""
        if sample_ids is not None and np.asarray(sample_ids).size:
            flat = np.asarray(sample_ids, dtype=np.int64).ravel()
            flat = flat[(flat >= 0) & (flat < vocab_size)]
            ids, counts = np.unique(flat, return_counts=True)
        elif token_counts is not None:
            tc = np.asarray(token_counts, dtype=np.int64).ravel()[:vocab_size]
            ids = np.flatnonzero(tc > 0)
            counts = tc[ids]
        else:
            ids = counts = np.zeros(0, dtype=np.int64)
        return cls.from_counts(vocab_size, ids, counts)

    def ranks(self, ids: np.ndarray) -> np.ndarray:
        """Rank (int64) of each id, same shape; ids must be in [0, vocab)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = self.size
        if n == 0:
            return ids.copy()
        if self.vocab_size <= _DENSE_MAX_VOCAB:
            return self._dense_ranks()[ids].astype(np.int64)
        pos = np.searchsorted(self.sorted_ids, ids)
        hit = self.sorted_ids[np.minimum(pos, n - 1)] == ids
        # An id outside the table: n + its index among non-table ids (id - table ids below it).
        return np.where(hit, self.rank_of_sorted[np.minimum(pos, n - 1)], n + ids - pos)

    def _dense_ranks(self) -> np.ndarray:
        """int32 [vocab]: rank of every id (built once; vocabularies up to 2^24 only)."""
        dense = self.__dict__.get("_dense")
        if dense is None:
            all_ids = np.arange(self.vocab_size, dtype=np.int64)
            pos = np.searchsorted(self.sorted_ids, all_ids)
            dense = (all_ids - pos + self.size).astype(np.int32)
            dense[self.sorted_ids] = self.rank_of_sorted
            object.__setattr__(self, "_dense", dense)
        return dense

    def escape_keys(self) -> np.ndarray:
        """int64 [n]: sorted_ids[j] - j, non-decreasing; the decoder's search key for ranks >= n.

        The x-th id not in the table is x + #{j : sorted_ids[j] - j <= x}."""
        return self.sorted_ids - np.arange(self.size, dtype=np.int64)

    def to_bytes(self) -> bytes:
        gaps = np.diff(self.sorted_ids, prepend=0) if self.size else self.sorted_ids
        payload = varint_encode(np.concatenate([gaps, self.counts_sorted]).astype(np.uint64))
        packed = zstandard.ZstdCompressor(level=19).compress(payload)
        return _HEADER.pack(_MAGIC, 1, self.vocab_size, self.size, len(packed)) + packed

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview) -> "RankTable":
        blob = bytes(blob)
        if len(blob) < _HEADER.size:
            raise ValueError(f"rank table: {len(blob)} bytes is shorter than its header")
        magic, version, vocab, n, zlen = _HEADER.unpack_from(blob)
        if magic != _MAGIC or version != 1:
            raise ValueError(f"rank table: bad magic/version {magic!r}/{version}")
        if not 0 < vocab < 2**31 or n > vocab or len(blob) != _HEADER.size + zlen:
            raise ValueError(f"rank table: inconsistent header (vocab {vocab}, n {n}, "
                             f"payload {zlen} of {len(blob) - _HEADER.size} bytes)")
        try:
            payload = zstandard.ZstdDecompressor().decompress(
                blob[_HEADER.size:], max_output_size=20 * n + 16)
        except zstandard.ZstdError as exc:
            raise ValueError(f"rank table: corrupt payload ({exc})") from None
        values = varint_decode(payload, 2 * n)
        gaps, counts = values[:n].astype(np.int64), values[n:].astype(np.int64)
        ids = np.cumsum(gaps)
        if n and (ids[-1] >= vocab or (n > 1 and gaps[1:].min() <= 0) or counts.min() <= 0):
            raise ValueError("rank table: ids not strictly increasing in [0, vocab) or count <= 0")
        return cls.from_counts(vocab, ids, counts)
