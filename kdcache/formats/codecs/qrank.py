"""`qrank`: quantised log-probs + frequency-ranked ids, field-separated streams through zstd.

Top-k targets (lossy on values, lossless on the id set), per window of m rows:

1. Values: the row's top log-prob on an absolute grid of 1/64 nat (`top`), every other entry
   as an integer code of its log-prob *relative to the top* with a probability-dependent step
   (quantize.LogProbQuantizer): uniform in sqrt(p / p_top) for likely entries, capped at
   `step_max` nats for improbable ones. Relative codes keep KL(renormalised top-k) within budget
   whatever the top-k mass (flat, high-entropy rows included); the top entry has code 0.
2. Ids -> ranks in a dataset-level frequency table (rank_table.RankTable; identity without one).
3. Each row is re-sorted by (code ascending, rank ascending). Quantisation made tied entries
   equal, so the order inside a tie is free: sorting it by rank lets the ranks after the first of
   a tie group be coded as gaps, which saves the log2(g!) bits an arbitrary order would cost.
4. Streams, in column-major order (entry 0 of every row, then entry 1, ...):
   - top:   each row's top log-prob as round(-log p_top * 64) (uint16)
   - dq:    code differences to the previous entry (>= 0) as nibbles min(dq, 15), two rows to a
            byte (row 2i high, 2i+1 low): pairs make a larger alphabet, on which zstd's
            Huffman code wastes less than on single, mostly-zero values
   - dq_escape: dq - 15 (uint16) for the entries whose nibble is 15
   - first: symbol of the rank of each entry that starts a tie group (dq > 0 or entry 0)
   - gap:   symbol of rank - previous rank - 1 for the other entries
   - col_bits: where each column's extra bits start (u64 [k + 1]), so the decoder can work on
            tiles of rows with one read position per column
   - bits:  the extra bits of both symbol kinds (qrank_kernels), packed, stored raw
   head/dq/first/gap are each one zstd frame: zstd's Huffman stage codes each byte stream close
   to its order-0 entropy and decodes at ~1 GB/s, and separating the fields (and positions) keeps
   each stream's statistics sharp. A numba kernel fuses the rest of the decode.

Sampled targets (lossless): per row its number of ids (narrowest uint, zstd), the ids' ranks in
row order (first-symbol stream + bits), and the weights: as integer counts with the row's draw
count N = `draws` (weights == float32(count / N) exactly, checked at encode time), else as float32.

Blob layout (little-endian): b"QRK" | u8 version | u8 kind (0 topk, 1 sampled) | u8 flags |
u16 param (top-k: sqrt_step in units of 1e-4) | u32 m | u32 k | u64 total extra bits | u8 n_streams | n_streams x (u32 stored
length, u32 raw length, u8 zstd?) | stream bytes in order.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np
import zstandard

from kdcache.formats.codecs import qrank_kernels as kern
from kdcache.formats.codecs.base import TargetCodec, id_dtype
from kdcache.formats.codecs.blocks import INLINE, BlockPool
from kdcache.formats.codecs.qrank_topk import SQRT_UNIT, encode_topk_streams, exp_shifted_levels
from kdcache.formats.codecs.quantize import LogProbQuantizer
from kdcache.formats.codecs.rank_table import RankTable

_MAGIC = b"QRK"
_VERSION = 1
_HEAD = struct.Struct("<3sBBBHIIQB")
_STREAM = struct.Struct("<IIB")
_KIND_CODE = {"topk": 0, "sampled": 1}
_FLAG_COUNTS = 1  # sampled: weights stored as counts of `draws`


def _padded(stream: bytes) -> np.ndarray:
    """uint8 copy of a symbol stream with zero bytes after it (the decoder reads ahead)."""
    out = np.zeros(len(stream) + kern.SYM_PADDING, dtype=np.uint8)
    out[:len(stream)] = np.frombuffer(stream, dtype=np.uint8)
    return out


def _padded_words(bits: bytes) -> np.ndarray:
    """uint64 copy of the packed extra bits with zero words after them (read-ahead room)."""
    n = len(bits) // 8
    out = np.zeros(n + kern.WORD_PADDING, dtype=np.uint64)
    out[:n] = np.frombuffer(bits, dtype="<u8", count=n)
    return out


class QRankCodec(TargetCodec):
    name = "qrank"

    def __init__(self, *, step_max: float = 1.0, sqrt_step: float = 0.025,
                 kl_target: float | None = 7e-4, level: int = 6, draws: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(step_max=step_max, sqrt_step=sqrt_step, kl_target=kl_target,
                         level=level, draws=draws, **kwargs)
        # One codec may encode windows from several threads at once (the writer does): zstd
        # (de)compressors are per thread, the quantiser cache is locked.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._quantizers: dict[int, tuple[LogProbQuantizer, np.ndarray, np.ndarray]] = {}
        self.step_max = float(step_max)
        self.sqrt_units = int(round(float(sqrt_step) / SQRT_UNIT))
        self.quantizer = self._quantizer(self.sqrt_units)[0]  # validates the parameters
        self.kl_target = None if kl_target is None else float(kl_target)
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"qrank: kl_target must be positive or None, got {kl_target}")
        self.level = int(level)
        if draws is not None and not 0 < int(draws) < 2**31:
            raise ValueError(f"qrank: draws must be in [1, 2^31), got {draws}")
        self.draws = None if draws is None else int(draws)
        self.rank_table = (RankTable.from_bytes(self.table) if self.table is not None
                           else RankTable.from_counts(self.vocab_size, np.zeros(0), np.zeros(0)))
        if self.rank_table.vocab_size != self.vocab_size:
            raise ValueError(f"qrank: table is for vocab {self.rank_table.vocab_size}, "
                             f"codec for {self.vocab_size}")
        self._ids_by_rank = self.rank_table.ids_by_rank
        self._escape_keys = self.rank_table.escape_keys()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def _zc(self) -> zstandard.ZstdCompressor:
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(level=self.level)
        return zc

    @property
    def _zd(self) -> zstandard.ZstdDecompressor:
        zd = getattr(self._local, "zd", None)
        if zd is None:
            zd = self._local.zd = zstandard.ZstdDecompressor()
        return zd

    def _quantizer(self, units: int) -> tuple[LogProbQuantizer, np.ndarray, np.ndarray]:
        """Quantiser, its decode table and the rate control's exp of it (qrank_topk) for
        sqrt_step = units * 1e-4 (cached, a few kept)."""
        with self._lock:
            entry = self._quantizers.get(units)
            if entry is None:
                q = LogProbQuantizer(step_max=self.step_max, sqrt_step=units * SQRT_UNIT)
                if len(self._quantizers) >= 8:
                    self._quantizers.pop(next(iter(self._quantizers)))
                levels = q.levels()
                entry = self._quantizers[units] = (q, levels, exp_shifted_levels(levels))
            return entry

    @classmethod
    def build_table(cls, *, vocab_size: int, token_counts: np.ndarray | None = None,
                    sample_ids: np.ndarray | None = None) -> bytes | None:
        if sample_ids is None and token_counts is None:
            return None
        return RankTable.from_sample(vocab_size, sample_ids, token_counts).to_bytes()

    # ---- encode -------------------------------------------------------------------------
    def encode(self, ids: np.ndarray, values: np.ndarray, *, pool: BlockPool | None = None) -> bytes:
        ids = np.asarray(ids)
        m = ids.shape[0]
        if ids.shape != (m, self.k) or np.shape(values) != (m, self.k):
            raise ValueError(f"qrank: expected [m, {self.k}] ids and values, got {ids.shape} "
                             f"and {np.shape(values)}")
        if self.kind == "topk":
            return self._encode_topk(ids, np.asarray(values, dtype=np.float32), pool or INLINE)
        return self._encode_sampled(ids, np.asarray(values, dtype=np.float32))

    def _encode_topk(self, ids: np.ndarray, values: np.ndarray, pool: BlockPool) -> bytes:
        units, total_bits, streams, bits = encode_topk_streams(self, ids, values, pool)
        return self._pack(ids.shape[0], 0, total_bits, streams, bits, param=units, pool=pool)

    def _encode_sampled(self, ids: np.ndarray, weights: np.ndarray) -> bytes:
        m, k = ids.shape
        real = ids >= 0
        lengths = real.sum(axis=1)
        flat_ids, flat_w = ids[real].astype(np.int64), weights[real]
        syms, nbits, extra = kern.symbolize(self.rank_table.ranks(flat_ids))
        flags, weight_bytes = 0, flat_w.astype("<f4").tobytes()
        if self.draws is not None and flat_w.size:
            counts = np.rint(flat_w.astype(np.float64) * self.draws)
            if counts.max() <= self.draws and np.array_equal(
                    (counts / self.draws).astype(np.float32), flat_w):
                flags = _FLAG_COUNTS
                weight_bytes = counts.astype(id_dtype(self.draws + 1).newbyteorder("<")).tobytes()
        streams = [lengths.astype(id_dtype(k + 1).newbyteorder("<")).tobytes(), syms.tobytes(),
                   weight_bytes]
        words = kern.pack_bits(nbits, extra)
        return self._pack(m, flags, int(nbits.sum()), streams, words.tobytes())

    def _pack(self, m: int, flags: int, total_bits: int, streams: list[bytes],
              bits: bytes, param: int = 0, pool: BlockPool = INLINE) -> bytes:
        # Largest streams first, so the pool's threads finish together.
        order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))
        packed = pool.map(lambda i: self._zc.compress(streams[i]) if streams[i] else b"", order)
        stored = [packed[order.index(i)] for i in range(len(streams))] + [bits]
        table = b"".join(_STREAM.pack(len(z), len(raw), int(i < len(streams) and bool(raw)))
                         for i, (z, raw) in enumerate(zip(stored, streams + [bits])))
        head = _HEAD.pack(_MAGIC, _VERSION, _KIND_CODE[self.kind], flags, param, m, self.k,
                          total_bits, len(stored))
        return head + table + b"".join(stored)

    # ---- decode -------------------------------------------------------------------------
    def _unpack(self, blob: bytes | memoryview, m: int, bounds: list[tuple[int, int]]):
        """(flags, param, total_bits, streams): header fields and the decompressed streams,
        each raw length checked against bounds."""
        buf = memoryview(blob).cast("B")
        if len(buf) < _HEAD.size:
            raise ValueError(f"qrank: blob of {len(buf)} bytes is shorter than its header")
        magic, version, kind, flags, param, bm, bk, total_bits, n = _HEAD.unpack_from(buf)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"qrank: bad magic or version ({bytes(magic)!r}, {version})")
        if kind != _KIND_CODE[self.kind] or bm != m or bk != self.k or n != len(bounds):
            raise ValueError(f"qrank: blob holds kind {kind}, {bm} rows of k={bk} in {n} streams; "
                             f"expected kind {_KIND_CODE[self.kind]}, {m} rows of k={self.k}")
        pos = _HEAD.size + n * _STREAM.size
        if len(buf) < pos:
            raise ValueError("qrank: blob truncated inside its stream table")
        out = []
        for i, (lo, hi) in enumerate(bounds):
            zlen, raw_len, packed = _STREAM.unpack_from(buf, _HEAD.size + i * _STREAM.size)
            if packed not in (0, 1) or not lo <= raw_len <= hi or pos + zlen > len(buf):
                raise ValueError(f"qrank: stream {i} claims {raw_len} bytes ({zlen} stored, zstd "
                                 f"flag {packed}); expected {lo}..{hi} within a blob of "
                                 f"{len(buf)} bytes, flag 0 or 1")
            data = buf[pos:pos + zlen]
            pos += zlen
            if packed:
                try:
                    if zstandard.frame_content_size(data) != raw_len:
                        raise ValueError(f"qrank: stream {i} frame size does not match its header")
                    data = self._zd.decompress(data, max_output_size=raw_len)
                except zstandard.ZstdError as exc:
                    raise ValueError(f"qrank: stream {i} is corrupt ({exc})") from None
            if len(data) != raw_len:
                raise ValueError(f"qrank: stream {i} holds {len(data)} bytes, expected {raw_len}")
            out.append(data)
        if pos != len(buf):
            raise ValueError(f"qrank: {len(buf) - pos} trailing bytes after the last stream")
        return flags, param, total_bits, out

    def decode(self, blob: bytes | memoryview, m: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "topk":
            return self._decode_topk(blob, m)
        return self._decode_sampled(blob, m)

    def _decode_topk(self, blob, m: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.k
        n_entries = m * k
        max_words = (n_entries * 29) // 64 + 2
        n_dq = (m + 1) // 2 * (k - 1)
        bounds = [(2 * m, 2 * m), (n_dq, n_dq), (0, 4 * n_dq), (0, n_entries), (0, n_entries),
                  (8 * (k + 1), 8 * (k + 1)), (16, 8 * max_words)]
        flags, units, total_bits, (head, dq, dq_esc, fsyms, gsyms, col_bits, bits) = \
            self._unpack(blob, m, bounds)
        if flags:
            raise ValueError(f"qrank: top-k blob with flags {flags} (no flag is defined)")
        col_bits = np.frombuffer(col_bits, dtype="<u8")
        if int(col_bits[-1]) != total_bits or len(bits) != 8 * (total_bits // 64 + 2):
            raise ValueError(f"qrank: {total_bits} extra bits in the header, col_bits ends at "
                             f"{int(col_bits[-1])}, bits stream of {len(bits)} bytes")
        if not 0 < units * SQRT_UNIT < self.step_max:
            raise ValueError(f"qrank: blob's sqrt_step {units * SQRT_UNIT} is not in (0, step_max)")
        levels = self._quantizer(units)[1]
        if len(fsyms) + len(gsyms) != n_entries or len(bits) % 8 or len(dq_esc) % 2:
            raise ValueError("qrank: symbol or bit stream sizes do not add up")
        out_ids = np.empty((m, k), dtype=np.int32)
        out_lp = np.empty((m, k), dtype=np.float32)
        status = kern.decode_topk(
            m, k, np.frombuffer(head, dtype="<u2"), np.frombuffer(dq, dtype=np.uint8),
            np.frombuffer(dq_esc, dtype="<u2"), _padded(fsyms), len(fsyms), _padded(gsyms),
            len(gsyms), _padded_words(bits), len(bits) // 8,
            col_bits.astype(np.int64), kern.SYM_BASE, kern.SYM_BITS,
            levels, self._ids_by_rank, self._escape_keys, self.vocab_size, out_ids, out_lp)
        if status != kern.OK:
            raise ValueError(f"qrank: corrupt top-k blob (decoder status {status})")
        return out_ids, out_lp

    def _decode_sampled(self, blob, m: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.k
        len_dtype = id_dtype(k + 1).newbyteorder("<")
        cnt_size = id_dtype((self.draws or 0) + 1).itemsize
        bounds = [(m * len_dtype.itemsize,) * 2, (0, m * k), (0, 4 * m * k),
                  (8, 8 * ((m * k * 29) // 64 + 2))]
        flags, param, total_bits, (lens, syms, wbytes, bits) = self._unpack(blob, m, bounds)
        if flags & ~_FLAG_COUNTS or param:
            raise ValueError(f"qrank: sampled blob with flags {flags}, param {param} (only flag "
                             f"{_FLAG_COUNTS} is defined, param is 0)")
        lengths = np.frombuffer(lens, dtype=len_dtype).astype(np.int64)
        total = int(lengths.sum())
        if m and (lengths.min() < 1 or lengths.max() > k) or len(syms) != total \
                or len(bits) != 8 * (total_bits // 64 + 2):
            raise ValueError("qrank: sampled row lengths, symbols and bits do not add up")
        if flags & _FLAG_COUNTS:
            if self.draws is None or len(wbytes) != total * cnt_size:
                raise ValueError("qrank: blob stores counts but the codec has no matching draws")
            counts = np.frombuffer(wbytes, dtype=id_dtype(self.draws + 1).newbyteorder("<"))
            flat_w = (counts.astype(np.float64) / self.draws).astype(np.float32)
        elif len(wbytes) == 4 * total:
            flat_w = np.frombuffer(wbytes, dtype="<f4")
        else:
            raise ValueError("qrank: sampled weight stream has the wrong size")
        flat_ids = np.empty(total, dtype=np.int32)
        status = kern.decode_ranks(total, np.frombuffer(syms, dtype=np.uint8),
                                   np.frombuffer(bits, dtype="<u8"), total_bits, kern.SYM_BASE,
                                   kern.SYM_BITS, self._ids_by_rank, self._escape_keys,
                                   self.vocab_size, flat_ids)
        if status != kern.OK:
            raise ValueError(f"qrank: corrupt sampled blob (decoder status {status})")
        real = np.arange(k)[None, :] < lengths[:, None]
        ids = np.full((m, k), -1, dtype=np.int32)
        values = np.zeros((m, k), dtype=np.float32)
        ids[real], values[real] = flat_ids, flat_w
        return ids, values
