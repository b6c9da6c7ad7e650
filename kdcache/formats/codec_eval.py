"""`kdcache codec eval`: size, fidelity and decode speed of a codec on a real top-k file.

The file (npz) holds `ids` int [N, k], `logprobs` float32 [N, k] (full-vocabulary log-probs, rows
descending) and `vocab_size`. The rows are encoded the way the writer would: in windows of
`window` rows, with the codec's dataset-level table (if it uses one) fitted on what a streaming
writer holds before its first shard: the first `table_tokens` rows of the file's own top-k ids.
The table's bytes are counted, amortised over the file's tokens (and, separately, over a
realistic 10M-token dataset).

Fidelity: KL(p || q) per token, p the original and q the decoded top-k, both renormalised over
the token's k ids (the codec keeps the id set exactly; rows are matched id by id).
Speed: decoding all windows from bytes to int32 ids and float32 log-probs, on one thread, median
of `repeats` runs after a warm-up; beside it, in the same process, plain zstd of int32 ids +
fp16 values decoded to the same arrays (`decode_vs_zstd` = our rate / its rate).
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.formats.codecs import get_codec
from kdcache.formats.validate import check_topk_rows

AMORTISE_TOKENS = 10_000_000  # a realistic dataset, for the table's share


class TopkFileError(KdcacheError):
    """A top-k npz given to `kdcache codec eval` is missing, malformed or inconsistent."""


@dataclass
class TopkFile:
    path: str
    ids: np.ndarray  # int64 [N, k]
    logprobs: np.ndarray  # float32 [N, k]
    vocab_size: int


def load_topk_npz(path: str | Path, k: int | None = None) -> TopkFile:
    """Load and check a top-k npz, truncated to its first k columns; TopkFileError if bad."""
    path = str(path)

    def fail(problem: str) -> None:
        raise TopkFileError(f"{path}: {problem}")

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        fail("no such file")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        fail(f"not a readable npz file ({exc})")
    missing = [key for key in ("ids", "logprobs", "vocab_size") if key not in arrays]
    if missing:
        fail(f"missing array(s) {', '.join(missing)}; expected ids, logprobs, vocab_size")
    ids, logprobs, vocab = arrays["ids"], arrays["logprobs"], arrays["vocab_size"]
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2:
        fail(f"ids must be an integer [N, k] array, got {ids.dtype} of shape {ids.shape}")
    if not np.issubdtype(logprobs.dtype, np.floating) or logprobs.shape != ids.shape:
        fail(f"logprobs must be a float [N, k] array matching ids {ids.shape}, got "
             f"{logprobs.dtype} of shape {logprobs.shape}")
    if vocab.shape != () or not np.issubdtype(vocab.dtype, np.integer) \
            or not 0 < int(vocab) < 2**31:
        fail(f"vocab_size must be an integer scalar in [1, 2^31), got {vocab!r}")
    n, file_k = ids.shape
    if n == 0 or file_k == 0:
        fail(f"no targets (shape {ids.shape})")
    if k is not None and not 0 < k <= file_k:
        fail(f"k={k} is not in [1, {file_k}] (the file holds top-{file_k})")
    k = file_k if k is None else k
    ids, logprobs = ids[:, :k].astype(np.int64), logprobs[:, :k].astype(np.float32)
    vocab = int(vocab)

    check_topk_rows(ids, logprobs, np.arange(n), vocab, fail)
    return TopkFile(path, ids, logprobs, vocab)


def renormalised_kl(ids: np.ndarray, logprobs: np.ndarray, dec_ids: np.ndarray,
                    dec_logprobs: np.ndarray) -> np.ndarray:
    """Per-token KL(p || q), both renormalised over the row's ids (float64 [N])."""
    o, d = np.argsort(ids, axis=1), np.argsort(dec_ids, axis=1)
    if not np.array_equal(np.take_along_axis(ids, o, 1), np.take_along_axis(dec_ids, d, 1)):
        raise RuntimeError("codec changed the set of ids of a row (a codec bug)")
    p = np.take_along_axis(logprobs, o, 1).astype(np.float64)
    q = np.take_along_axis(dec_logprobs, d, 1).astype(np.float64)
    p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
    q -= np.logaddexp.reduce(q, axis=1, keepdims=True)
    return np.maximum((np.exp(p) * (p - q)).sum(axis=1), 0.0)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: JIT, page faults, caches
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _single_thread() -> None:
    import numba

    numba.set_num_threads(1)


def evaluate(topk: TopkFile, codec_name: str, *, window: int = 8192, table_tokens: int = 8192,
             repeats: int = 5, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode, decode and time one codec on a top-k file; the result dict is the JSON line."""
    import zstandard

    _single_thread()
    ids, logprobs, vocab = topk.ids, topk.logprobs, topk.vocab_size
    n, k = ids.shape
    try:
        cls = get_codec(codec_name)
    except KeyError as exc:
        raise TopkFileError(str(exc.args[0])) from None
    table = None
    if table_tokens > 0:
        table = cls.build_table(vocab_size=vocab, sample_ids=ids[:table_tokens])
    codec = cls(kind="topk", k=k, vocab_size=vocab, table=table, **(params or {}))
    bounds = [(s, min(s + window, n)) for s in range(0, n, window)]

    start = time.perf_counter()
    blobs = [codec.encode(ids[a:b], logprobs[a:b]) for a, b in bounds]
    encode_s = time.perf_counter() - start

    def decode_all():
        return [codec.decode(blob, b - a) for blob, (a, b) in zip(blobs, bounds)]

    decoded = decode_all()
    dec_ids = np.concatenate([d[0] for d in decoded])
    dec_lp = np.concatenate([d[1] for d in decoded])
    kl = renormalised_kl(ids, logprobs, dec_ids.astype(np.int64), dec_lp)
    decode_s = _median_seconds(decode_all, repeats)

    # Baseline: plain zstd (level 3) of int32 ids + fp16 log-probs, decoded to int32/float32.
    zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    zblobs = [zc.compress(ids[a:b].astype(np.int32).tobytes()
                          + logprobs[a:b].astype(np.float16).tobytes()) for a, b in bounds]

    def zstd_decode_all():
        out = []
        for blob, (a, b) in zip(zblobs, bounds):
            raw = zd.decompress(blob)
            cut = (b - a) * k * 4
            out.append((np.frombuffer(raw, np.int32, count=(b - a) * k).reshape(b - a, k).copy(),
                        np.frombuffer(raw, np.float16, offset=cut).astype(np.float32)))
        return out

    zstd_s = _median_seconds(zstd_decode_all, repeats)
    stream_bytes = sum(len(b) for b in blobs)
    table_bytes = len(table) if table is not None else 0
    entries = n * k
    rate, zrate = n / decode_s, n / zstd_s
    return {
        "codec": codec_name,
        "k": k,
        "vocab_size": vocab,
        "tokens": n,
        "window": window,
        "bytes_per_token": (stream_bytes + table_bytes) / n,
        "bytes_per_entry": (stream_bytes + table_bytes) / entries,
        "stream_bytes_per_entry": stream_bytes / entries,
        "table_bytes": table_bytes,
        "table_fit": (f"first {min(table_tokens, n)} tokens of this file" if table is not None
                      else "none"),
        "bytes_per_entry_table_over_10M_tokens":
            (stream_bytes / n + table_bytes / AMORTISE_TOKENS) / k,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "decode_tokens_per_s": rate,
        "zstd_decode_tokens_per_s": zrate,
        "zstd_bytes_per_entry": sum(len(b) for b in zblobs) / entries,
        "decode_vs_zstd": rate / zrate,
        "encode_tokens_per_s": n / encode_s,
        "codec_params": codec.config(),
        "file": topk.path,
    }


def format_table(result: dict[str, Any]) -> str:
    """A small human summary of one evaluation."""
    rows = [
        ("codec", f"{result['codec']}  (k={result['k']}, vocab={result['vocab_size']:,}, "
                  f"{result['tokens']:,} tokens)"),
        ("bytes / entry", f"{result['bytes_per_entry']:.4f}  ({result['bytes_per_token']:.2f} "
                          f"B/token; table {result['table_bytes']:,} B, "
                          f"{result['table_fit']})"),
        ("KL mean / max", f"{result['kl_mean']:.3e} / {result['kl_max']:.3e} nats/token"),
        ("decode", f"{result['decode_tokens_per_s']:,.0f} tokens/s on one thread "
                   f"({result['decode_vs_zstd']:.2f}x plain zstd int32+fp16)"),
        ("encode", f"{result['encode_tokens_per_s']:,.0f} tokens/s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
