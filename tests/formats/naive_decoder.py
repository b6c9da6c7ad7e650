"""A second, deliberately naive reader of kdcache datasets, written from FORMAT.md alone.

It uses numpy, zstandard, pyarrow and xxhash only and nothing from kdcache: it is the check that
the text suffices (FORMAT.md sections 5-7). Plain Python loops, no speed; it raises
NaiveFormatError on anything the text says is invalid. Section numbers refer to FORMAT.md.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash
import zstandard


class NaiveFormatError(Exception):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise NaiveFormatError(msg)


def _uint(n: int) -> np.dtype:
    """Section 7: the narrowest unsigned little-endian type holding 0..n-1."""
    if n <= 2**8:
        return np.dtype("u1")
    if n <= 2**16:
        return np.dtype("<u2")
    return np.dtype("<u4")


def _zstd(data: bytes, raw_length: int) -> bytes:
    """One zstd frame whose header records its content size (section 7)."""
    _need(zstandard.frame_content_size(data) == raw_length, "zstd frame size mismatch")
    out = zstandard.ZstdDecompressor().decompress(data)
    _need(len(out) == raw_length, "zstd content length mismatch")
    return out


def _safe_path(root: Path, rel: str) -> Path:
    """Section 1: relative, no absolute path, no '..' or empty component."""
    parts = rel.split("/")
    _need(not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts),
          f"unsafe path {rel!r}")
    return root.joinpath(*parts)


def _xxh3(data: bytes) -> str:
    """Section 6: XXH3-64, seed 0, 16 lowercase hex digits."""
    return f"{xxhash.xxh3_64_intdigest(data, seed=0):016x}"


# ---- section 7.3: the rank table ------------------------------------------------------------
class RankTable:
    def __init__(self, vocab: int, ids_ascending: list[int], counts: list[int]) -> None:
        self.vocab = vocab
        self.ids = ids_ascending
        order = sorted(range(len(ids_ascending)), key=lambda j: (-counts[j], ids_ascending[j]))
        self.by_rank = [ids_ascending[j] for j in order]
        self.e = [ids_ascending[j] - j for j in range(len(ids_ascending))]

    @classmethod
    def empty(cls, vocab: int) -> "RankTable":
        return cls(vocab, [], [])

    @classmethod
    def parse(cls, data: bytes, vocab: int) -> "RankTable":
        _need(len(data) >= 17 and data[:4] == b"KDRT" and data[4] == 1, "bad rank table header")
        table_vocab, n, z = struct.unpack_from("<III", data, 5)
        _need(table_vocab == vocab and n <= vocab and len(data) == 17 + z, "bad rank table sizes")
        payload = zstandard.ZstdDecompressor().decompress(data[17:], max_output_size=12 * 2 * n + 16)
        values: list[int] = []
        pos = 0
        while pos < len(payload):
            v, shift = 0, 0
            while True:
                _need(pos < len(payload) and shift <= 35, "bad varint")
                b = payload[pos]
                pos += 1
                v |= (b & 127) << shift
                shift += 7
                if b < 128:
                    break
            values.append(v)
        _need(len(values) == 2 * n, "rank table: wrong number of varints")
        ids, acc = [], 0
        for i, gap in enumerate(values[:n]):
            _need(i == 0 or gap >= 1, "rank table: ids not ascending")
            acc += gap
            ids.append(acc)
        counts = values[n:]
        _need(all(c >= 1 for c in counts) and (not ids or ids[-1] < vocab), "rank table values")
        return cls(vocab, ids, counts)

    def id_of(self, rank: int) -> int:
        n = len(self.by_rank)
        if rank < n:
            return self.by_rank[rank]
        x = rank - n
        out = x + sum(1 for e in self.e if e <= x)
        _need(out < self.vocab, f"rank {rank} gives id {out} >= vocab {self.vocab}")
        return out


# ---- section 7.4: symbols, extra bits, the value grid ----------------------------------------
class BitString:
    def __init__(self, data: bytes, limit: int) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        self.pos = 0
        self.limit = limit

    def read(self, b: int) -> int:
        _need(self.pos + b <= self.limit, "extra bits read past their bound")
        v = 0
        for i in range(b):
            v |= int(self.bits[self.pos + i]) << i
        self.pos += b
        return v


def read_symbol(s: int, bits: BitString) -> int:
    """The integer x coded by symbol s and its extra bits."""
    _need(s <= 122, f"invalid symbol {s}")
    if s < 3:
        return s
    b, mant = (s - 3) // 4, (s - 3) % 4
    v = ((4 + mant) << b) | bits.read(b)
    return v - 1


def value_table(u: int, step_max: float) -> np.ndarray:
    S = float(step_max)
    a = u * 1e-4
    _need(0 < a < S, f"u={u} out of range for step_max {S}")
    t = 2 * math.log(a / S)
    h = math.exp(t / 2)
    y_top = 2 * (1 - h) / a
    y = y_top - np.arange(65536, dtype=np.float64)
    upper = 2 * np.log(np.maximum(y * a / 2 + h, 1e-300))
    lower = t + y * S
    return np.minimum(np.where(y >= 0, upper, lower), 0.0).astype(np.float32)


# ---- section 7.2: the qrank container -------------------------------------------------------
def qrank_streams(blob: bytes, kind: int, m: int, k: int):
    _need(len(blob) >= 25, "blob shorter than its header")
    magic, version, bkind, flags, param, bm, bk, T, S = struct.unpack_from("<3sBBBHIIQB", blob)
    _need(magic == b"QRK" and version == 1, "bad magic/version")
    _need(bkind == kind and bm == m and bk == k and S == (7 if kind == 0 else 4), "header mismatch")
    pos = 25 + 9 * S
    _need(len(blob) >= pos, "truncated stream table")
    streams = []
    for i in range(S):
        stored, raw, packed = struct.unpack_from("<IIB", blob, 25 + 9 * i)
        _need(pos + stored <= len(blob), "stream runs past the blob")
        data = blob[pos:pos + stored]
        pos += stored
        if packed:
            data = _zstd(data, raw)
        else:
            _need(stored == raw, "raw stream length mismatch")
        streams.append(data)
    _need(pos == len(blob), "bytes after the last stream")
    return flags, param, T, streams


class Coverage:
    """Counts of the rarer branches a decode went through (so tests can show the vectors reach
    them)."""

    def __init__(self) -> None:
        self.escapes = self.gap_symbols = self.table_escapes = self.extra_bits = 0
        self.empty_blobs = self.count_weights = self.float_weights = self.odd_m = 0


def decode_qrank_topk(blob: bytes, m: int, k: int, table: RankTable, step_max: float,
                      cov: Coverage) -> tuple[np.ndarray, np.ndarray]:
    flags, u, T, (top_s, dq_s, esc_s, first_s, gap_s, colb_s, bits_s) = qrank_streams(blob, 0, m, k)
    half = (m + 1) // 2
    _need(len(top_s) == 2 * m and len(dq_s) == (k - 1) * half and len(colb_s) == 8 * (k + 1),
          "topk stream sizes")
    _need(len(bits_s) == 8 * (T // 64 + 2) and len(esc_s) % 2 == 0, "bits/escape sizes")
    L = value_table(u, step_max)
    top = np.frombuffer(top_s, dtype="<u2")
    escapes = list(np.frombuffer(esc_s, dtype="<u2"))
    col_bits = [int(x) for x in np.frombuffer(colb_s, dtype="<u8")]
    _need(col_bits[0] == 0 and col_bits[k] == T, "col_bits ends")
    cov.escapes += len(escapes)
    cov.odd_m += m % 2
    cov.empty_blobs += m == 0
    # dq per (column, row), columns 1..k-1.
    dq = np.zeros((k, m), dtype=np.int64)
    e = 0
    for col in range(1, k):
        for r in range(m):
            byte = dq_s[(col - 1) * half + r // 2]
            nib = byte >> 4 if r % 2 == 0 else byte & 15
            if nib == 15:
                _need(e < len(escapes), "escape stream too short")
                nib = 15 + int(escapes[e])
                e += 1
            dq[col, r] = nib
    _need(e == len(escapes), "escape stream too long")
    codes = np.cumsum(dq, axis=0)
    _need(codes.size == 0 or codes.max() <= 65535, "code above 65535")
    bits = BitString(bits_s, T)
    first, gap = list(first_s), list(gap_s)
    fi = gi = 0
    ranks = np.zeros((k, m), dtype=np.int64)
    for col in range(k):
        _need(bits.pos == col_bits[col], "column bit position")
        for r in range(m):
            starts = col == 0 or dq[col, r] > 0
            if starts:
                _need(fi < len(first), "first stream too short")
                x = read_symbol(first[fi], bits)
                fi += 1
                ranks[col, r] = x
            else:
                _need(gi < len(gap), "gap stream too short")
                x = read_symbol(gap[gi], bits)
                gi += 1
                ranks[col, r] = ranks[col - 1, r] + x + 1
                cov.gap_symbols += 1
    _need(fi == len(first) and gi == len(gap) and bits.pos == T, "streams not used up")
    cov.extra_bits += T
    ids = np.zeros((m, k), dtype=np.int32)
    values = np.zeros((m, k), dtype=np.float32)
    for r in range(m):
        top_lp = np.float32(-int(top[r]) / 64)
        for j in range(k):
            rank = int(ranks[j, r])
            cov.table_escapes += rank >= len(table.by_rank)
            ids[r, j] = table.id_of(rank)
            values[r, j] = top_lp if j == 0 else np.float32(top_lp + L[codes[j, r]])
    return ids, values


def decode_qrank_sampled(blob: bytes, m: int, k: int, table: RankTable, draws: int | None,
                         cov: Coverage) -> tuple[np.ndarray, np.ndarray]:
    flags, _, T, (len_s, sym_s, w_s, bits_s) = qrank_streams(blob, 1, m, k)
    lengths = np.frombuffer(len_s, dtype=_uint(k + 1))
    _need(len(lengths) * lengths.itemsize == len(len_s) and len(lengths) == m, "lengths size")
    _need(all(1 <= x <= k for x in lengths), "row length out of 1..k")
    N = int(lengths.sum())
    _need(len(sym_s) == N and len(bits_s) == 8 * (T // 64 + 2), "symbols/bits sizes")
    if flags & 1:
        _need(draws is not None, "counts without draws")
        counts = np.frombuffer(w_s, dtype=_uint(draws + 1))
        _need(len(counts) == N and len(w_s) == N * counts.itemsize, "counts size")
        weights = [np.float32(float(c) / draws) for c in counts]
        cov.count_weights += N
    else:
        _need(len(w_s) == 4 * N, "weights size")
        weights = list(np.frombuffer(w_s, dtype="<f4"))
        cov.float_weights += N
    bits = BitString(bits_s, T)
    ids = np.full((m, k), -1, dtype=np.int32)
    values = np.zeros((m, k), dtype=np.float32)
    i = 0
    for r in range(m):
        for j in range(int(lengths[r])):
            ids[r, j] = table.id_of(read_symbol(sym_s[i], bits))
            values[r, j] = weights[i]
            i += 1
    _need(bits.pos == T, "bits not used up")
    cov.extra_bits += T
    cov.empty_blobs += m == 0
    return ids, values


def decode_raw(blob: bytes, m: int, k: int, vocab: int, cov: Coverage):
    dt = _uint(vocab + 1)
    payload = _zstd(blob, m * k * (dt.itemsize + 4))
    ids = np.frombuffer(payload, dtype=dt, count=m * k).astype(np.int64).reshape(m, k)
    ids[ids == vocab] = -1
    values = np.frombuffer(payload, dtype="<f4", offset=m * k * dt.itemsize).reshape(m, k)
    cov.empty_blobs += m == 0
    return ids.astype(np.int32), values.copy()


# ---- sections 5, 8, 9: the dataset ----------------------------------------------------------
def read_dataset(root: str | Path) -> tuple[list[dict[str, np.ndarray]], Coverage]:
    """Every window of a dataset as numpy arrays (tokens, doc_offsets, valid, ids, values) with
    invalid rows filled as section 2 says, and the branch coverage of the decode."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    _need(manifest.get("format") == "kdcache-logits", "not a kdcache manifest")
    _need(str(manifest["format_version"]).split(".")[0] == "1", "unknown major version")
    targets, codec = manifest["targets"], manifest["codec"]
    kind, k, vocab = targets["kind"], int(targets["k"]), int(targets["vocab_size"])
    params = codec.get("params") or {}
    table = RankTable.empty(vocab)
    if codec.get("table"):
        data = _safe_path(root, codec["table"]["path"]).read_bytes()
        _need(len(data) == codec["table"]["bytes"] and _xxh3(data) == codec["table"]["xxh3"],
              "codec table size/hash")
        table = RankTable.parse(data, vocab)
    cov = Coverage()
    windows = []
    for entry in manifest["shards"]:
        data = _safe_path(root, entry["name"]).read_bytes()
        _need(len(data) == entry["bytes"] and data[:6] == b"ARROW1" and data[-6:] == b"ARROW1",
              "shard size/magic")
        _need(_xxh3(data) == entry["xxh3"], "shard hash")
        reader = ipc.open_file(pa.py_buffer(data))
        meta = {kk.decode(): vv.decode() for kk, vv in (reader.schema.metadata or {}).items()}
        want = {"kdcache.kind": kind, "kdcache.k": str(k), "kdcache.vocab_size": str(vocab),
                "kdcache.codec": codec["name"], "kdcache.mode": manifest["packing"]["mode"]}
        _need(all(meta.get(kk) == vv for kk, vv in want.items())
              and meta.get("kdcache.format_version", "").split(".")[0] == "1",
              f"shard metadata {meta}")
        _need(reader.num_record_batches == entry["windows"], "record batch count")
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            batch.validate(full=True)
            row = batch.to_pylist()
            _need(len(row) == 1, "a window batch has one row")
            row = row[0]
            tokens = np.array(row["tokens"], dtype=np.int64)
            valid = np.array(row["valid"], dtype=bool)
            offsets = np.array(row["doc_offsets"], dtype=np.int64)
            n = len(tokens)
            _need(len(valid) == n and offsets[0] == 0 and offsets[-1] == n
                  and np.all(np.diff(offsets) > 0), "window structure")
            m = int(valid.sum())
            blob = row["targets"]
            if codec["name"] == "raw":
                ids_v, vals_v = decode_raw(blob, m, k, vocab, cov)
            elif codec["name"] == "qrank" and kind == "topk":
                ids_v, vals_v = decode_qrank_topk(blob, m, k, table, params.get("step_max", 1.0),
                                                  cov)
            elif codec["name"] == "qrank":
                ids_v, vals_v = decode_qrank_sampled(blob, m, k, table, params.get("draws"), cov)
            else:
                raise NaiveFormatError(f"unknown codec {codec['name']!r}")
            ids = np.full((n, k), -1, dtype=np.int32)
            values = np.full((n, k), -np.inf if kind == "topk" else 0.0, dtype=np.float32)
            ids[valid], values[valid] = ids_v, vals_v
            windows.append({"window_index": int(row["window_index"]), "tokens": tokens,
                            "doc_offsets": offsets, "valid": valid, "ids": ids, "values": values})
    return windows, cov


def check_values(kind: str, ids: np.ndarray, values: np.ndarray, vocab: int) -> None:
    """Section 3's value rules with the tolerances a conforming reader must accept (valid rows)."""
    if kind == "topk":
        _need(((ids >= 0) & (ids < vocab)).all(), "id out of range")
        _need(np.isfinite(values).all() and (values <= 1e-4).all(), "log-prob above 1e-4")
        _need((np.diff(values, axis=1) <= 1e-5).all(), "not descending within 1e-5")
        _need((np.exp(values.astype(np.float64)).sum(axis=1) <= 1 + 1e-3).all(), "mass > 1+1e-3")
        for row in ids:
            _need(len(set(row.tolist())) == len(row), "repeated id")
    else:
        real = ids >= 0
        _need(real[:, 0].all() and not (~real[:, :-1] & real[:, 1:]).any(), "padding placement")
        _need((ids[real] < vocab).all() and (ids >= -1).all(), "id out of range")
        _need(np.isfinite(values).all() and (values >= 0).all() and (values[~real] == 0).all(),
              "weights")
        _need((np.abs(values.astype(np.float64).sum(axis=1) - 1) <= 1e-3).all(), "weights sum")
        for row in ids:
            r = row[row >= 0].tolist()
            _need(len(set(r)) == len(r), "repeated id")
