"""Teacher-dump throughput against the work no implementation can skip (issue 3's figure).

Builds the `bench` teacher (4 layers, 256 wide, 32k vocabulary; random weights suffice for
timing) and measures, with started engines reused across measurements:
- ratio = dump throughput / ceiling at k = 16, 64, 256 on 8k windows (and 32k with --long),
  with vLLM's prompt-logprobs path as the baseline side by side;
- the driver's peak Python memory (tracemalloc) while packing and handing out shards, for the
  built-in corpus at N and 10N documents (it must not grow with the corpus).
Prints one JSON line. Usage: .venv/bin/python bench/bench_dump.py [--long] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc


def driver_peak_mb(model: str, documents: int, shuffle_buffer: int = 512) -> float:
    from kdcache.teacher_dump.corpus import CorpusStats
    from kdcache.teacher_dump.pack import PackStats, TeacherTokenizer
    from kdcache.teacher_dump.plan import DumpConfig
    from kdcache.teacher_dump.runner import iter_shards
    from kdcache.teacher_dump.workers import window_to_dict

    cfg = DumpConfig.from_options(model=model, corpus="builtin", out="unused", window=8192,
                     builtin_documents=documents, windows_per_shard=4,
                     shuffle_buffer=shuffle_buffer)
    tok = TeacherTokenizer(model)
    tracemalloc.start()
    shards = 0
    for _, wins in iter_shards(cfg, tok, CorpusStats(), PackStats()):
        payload = [window_to_dict(w) for w in wins]  # what the driver hands to an actor
        shards += 1
        del payload
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return round(peak / 2**20, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also 32k windows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="teacher dir (default: build `bench`)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher

        model = os.path.join(tempfile.mkdtemp(prefix="kdcache-bench-teacher-"), "bench")
        build_teacher(model, TeacherConfig.preset("bench"), log=lambda m: None)
    out = {"bench": "dump", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": "bench preset: 4 layers, 256 wide, 32k vocab", "cpus": os.cpu_count(),
           "load_avg_1m": os.getloadavg()[0], "results": []}
    if not args.memory_only:
        _throughput(args, model, out)
    if not args.skip_memory:
        # the shuffle buffer (512 documents here) is the only thing that grows with the corpus,
        # and it is capped: 2,000 and 20,000 documents must peak alike
        out["driver_peak_mb"] = {"2000_docs": driver_peak_mb(model, 2000),
                                 "20000_docs": driver_peak_mb(model, 20000),
                                 "shuffle_buffer": 512}
    out["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(out))


def _throughput(args, model: str, out: dict) -> None:
    from kdcache.teacher_dump.bench import BenchConfig, bench_many, bench_series

    sizes = [(8192, 2)] + ([(32768, 1)] if args.long else [])
    cfgs = bench_series(BenchConfig(model=model, rounds=args.rounds), [16, 64, 256], sizes)
    for r in bench_many(cfgs):
        out["results"].append(r)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
