"""Shard writing (validate + qrank encode + Arrow + atomic write) with 1 vs N encode threads.

    python bench/bench_encode.py [--threads 1,2,4] [--windows 16] [--window 8192] [--k 64]

A GPU teacher produces top-k far faster than one core encodes it (qrank encodes 35-80k tokens/s
per core), so write_shard validates and encodes windows in a thread pool. This times the same
windows written with each thread count, interleaved over rounds (median), checks that every
thread count writes the same bytes, and prints one JSON line: tokens/s per thread count and the
speed-up over one thread (the baseline, same process). Synthetic document-mode windows at
V=202,048 (kdcache.formats.synthetic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.formats.manifest import DatasetHeader  # noqa: E402
from kdcache.formats.synthetic import synthetic_window  # noqa: E402
from kdcache.formats.writer import prepare_codec, write_shard  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1 is the baseline)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=202_048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    counts = sorted({int(t) for t in args.threads.split(",")} | {1})
    header = DatasetHeader(kind="topk", k=args.k, vocab_size=args.vocab, codec="qrank",
                           packing={"window": args.window, "mode": "document"})
    rng = np.random.default_rng(0)
    windows = [synthetic_window(rng, i, args.window, args.vocab, args.k) for i in range(args.windows)]
    codec = prepare_codec(header, sample_ids=windows[0].ids)
    tokens = sum(w.n_tokens for w in windows)
    times: dict[int, list[float]] = {t: [] for t in counts}
    hashes: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in counts:  # warm-up: numba compilation, page cache
            hashes[t] = write_shard(os.path.join(tmp, f"w{t}"), "shard-00000", iter(windows), header,
                                    codec, encode_threads=t).xxh3
        for r in range(args.rounds):
            for t in counts:
                t0 = time.perf_counter()
                write_shard(os.path.join(tmp, f"r{r}t{t}"), "shard-00000", iter(windows), header, codec,
                            encode_threads=t)
                times[t].append(time.perf_counter() - t0)
    med = {t: statistics.median(v) for t, v in times.items()}
    rec = {"bench": "encode_threads", "windows": args.windows, "window": args.window, "k": args.k,
           "vocab_size": args.vocab, "tokens": tokens, "cpus": len(os.sched_getaffinity(0)),
           "load_avg_1m": round(os.getloadavg()[0], 2),
           "tokens_per_s": {str(t): round(tokens / med[t]) for t in counts},
           "speedup_vs_1_thread": {str(t): round(med[1] / med[t], 2) for t in counts},
           "same_bytes_for_every_thread_count": len(set(hashes.values())) == 1}
    print(json.dumps(rec), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "encode_bench.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0 if rec["same_bytes_for_every_thread_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
