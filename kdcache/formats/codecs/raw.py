"""`raw`: lossless baseline. Ids in the narrowest unsigned dtype, values as float32, zstd-framed.

Exact but large (about 6 B per entry at a 16-bit vocabulary): for debugging, for tests that need
bit-exact round trips, and as the baseline every other codec is measured against.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kdcache.formats.codecs.base import TargetCodec, id_dtype
from kdcache.formats.codecs.blocks import BlockPool


class RawCodec(TargetCodec):
    name = "raw"
    lossless = True

    def __init__(self, *, level: int = 3, **kwargs) -> None:
        super().__init__(level=level, **kwargs)
        self.level = level

    def encode(self, ids: np.ndarray, values: np.ndarray, *,
               pool: BlockPool | None = None) -> bytes:  # one zstd frame: nothing to spread
        m = ids.shape[0]
        # -1 padding (sampled targets) is stored as vocab_size, which no real id reaches.
        stored = np.where(ids < 0, self.vocab_size, ids).astype(id_dtype(self.vocab_size + 1))
        payload = stored.tobytes() + np.ascontiguousarray(values, dtype=np.float32).tobytes()
        assert stored.shape == (m, self.k)
        return zstandard.ZstdCompressor(level=self.level).compress(payload)

    def decode(self, blob: bytes | memoryview, m: int) -> tuple[np.ndarray, np.ndarray]:
        dtype = id_dtype(self.vocab_size + 1)
        n_entries = m * self.k
        expected = n_entries * (dtype.itemsize + 4)
        payload = zstandard.ZstdDecompressor().decompress(blob, max_output_size=expected)
        if len(payload) != expected:
            raise ValueError(f"raw codec: expected {expected} decoded bytes, got {len(payload)}")
        ids = np.frombuffer(payload, dtype=dtype, count=n_entries).astype(np.int32)
        ids[ids == self.vocab_size] = -1
        values = np.frombuffer(payload, dtype=np.float32, offset=n_entries * dtype.itemsize)
        return ids.reshape(m, self.k), values.reshape(m, self.k).copy()
