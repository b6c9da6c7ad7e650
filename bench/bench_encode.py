"""Shard writing (validate + qrank encode + Arrow + atomic write): N worker processes vs N threads.

    python bench/bench_encode.py [--workers 1,2,4] [--threads 1,2,4] [--windows 16]
                                 [--window 8192] [--k 64]

A GPU teacher produces top-k far faster than one core encodes it (qrank encodes 20-110k
tokens/s per core, by k), so write_shard spreads each window's row blocks over worker processes
(`--workers`, the dump's default) or, as before, over threads of one process (`--threads`).
This times the same windows written with each count and kind, interleaved over rounds (median),
checks that every one writes the same bytes, and prints one JSON line: tokens/s per count and
the speed-up over one (inline: no workers, no threads; the baseline, same process). Synthetic
windows at V=202,048 (kdcache.formats.synthetic).
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

from kdcache.formats.codecs.procs import WORKER_NICE  # noqa: E402
from kdcache.formats.manifest import DatasetHeader  # noqa: E402
from kdcache.formats.synthetic import synthetic_window  # noqa: E402
from kdcache.formats.writer import prepare_codec, write_shard  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker-process counts")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (the old path)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--mode", default="document", choices=["document", "causal"])
    ap.add_argument("--vocab", type=int, default=202_048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    # (label, count, processes); count 1 is the inline baseline either way
    cells = [("1", 1, False)]
    cells += [(f"workers_{n}", n, True) for n in _counts(args.workers) if n > 1]
    cells += [(f"threads_{n}", n, False) for n in _counts(args.threads) if n > 1]
    header = DatasetHeader(kind="topk", k=args.k, vocab_size=args.vocab, codec="qrank",
                           packing={"window": args.window, "mode": args.mode})
    rng = np.random.default_rng(0)
    windows = [synthetic_window(rng, i, args.window, args.vocab, args.k, mode=args.mode)
               for i in range(args.windows)]
    codec = prepare_codec(header, sample_ids=windows[0].ids)
    tokens = sum(w.n_tokens for w in windows)
    times: dict[str, list[float]] = {c[0]: [] for c in cells}
    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n, procs in cells:  # warm-up: worker start, numba cache, page cache
            hashes[label] = write_shard(os.path.join(tmp, f"w{label}"), "shard-00000",
                                        iter(windows), header, codec, encode_workers=n,
                                        processes=procs).xxh3
        for r in range(args.rounds):
            for label, n, procs in cells:
                t0 = time.perf_counter()
                write_shard(os.path.join(tmp, f"r{r}{label}"), "shard-00000", iter(windows),
                            header, codec, encode_workers=n, processes=procs)
                times[label].append(time.perf_counter() - t0)
    med = {t: statistics.median(v) for t, v in times.items()}
    rec = {"bench": "encode_workers", "windows": args.windows, "window": args.window,
           "k": args.k, "mode": args.mode, "vocab_size": args.vocab, "tokens": tokens,
           "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
           "load_avg_1m": round(os.getloadavg()[0], 2), "worker_nice": WORKER_NICE,
           "tokens_per_s": {t: round(tokens / med[t]) for t in med},
           "speedup_vs_inline": {t: round(med["1"] / med[t], 2) for t in med},
           "same_bytes_everywhere": len(set(hashes.values())) == 1}
    print(json.dumps(rec), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "encode_bench.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0 if rec["same_bytes_everywhere"] else 1


def _counts(spec: str) -> list[int]:
    return sorted({int(t) for t in spec.split(",") if t.strip()})


if __name__ == "__main__":
    sys.exit(main())
