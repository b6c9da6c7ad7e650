"""Data loader speed: windows -> training batches, against the GPU's consumption rate.

One JSON line. Writes a synthetic format-valid dataset at the paper's vocabulary (V = 202,048,
top-k targets, the default codec) in a temporary directory, then measures, in the same process:

  reader     open_dataset + ds[i] for every window (decode only: the baseline)
  loader_wN  the training DataModule's DataLoader with N workers: seeded order, decode, labels,
             segment ids, padding to batch tensors, for full windows (stage 2) and for
             2,048-token rows cut from document-mode windows (stage 1)

and compares each loader rate with the GPU's training rate for the same shape (--gpu-stage2 /
--gpu-stage1 tokens/s, the H200 figures from bench_train.py in BENCHMARKS.md): the loader must be
at least 10x faster so that the data path never starves the GPU. Note that this CPU has 2 cores
shared with other work; a GPU host has 16+.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kdcache.formats.reader import open_dataset  # noqa: E402
from kdcache.formats.synthetic import write_synthetic_dataset  # noqa: E402
from kdcache.student_train.data import DataConfig, WindowDataModule  # noqa: E402


def rate_reader(path: str, passes: int) -> float:
    ds = open_dataset(path)
    ds[0]  # open, hash-check and JIT-compile the decoder outside the timing
    start, tokens = time.perf_counter(), 0
    for _ in range(passes):
        for i in range(len(ds)):
            tokens += ds[i].n_tokens
    return tokens / (time.perf_counter() - start)


def rate_loader(path: str, workers: int, window: int | None,
                passes: int) -> tuple[float, float, float]:
    """Steady-state tokens/s (from each epoch's first batch on), tokens per CPU-second of this
    process (meaningful with 0 workers: every step runs here) and first-batch latency (s)."""
    dm = WindowDataModule(DataConfig(paths=[path], window=window, num_workers=workers,
                                     pin_memory=False), student_vocab_size=202_048)
    seconds, cpu_seconds, tokens, first = 0.0, 0.0, 0, []
    for _ in range(passes):
        start = time.perf_counter()
        for index, batch in enumerate(dm.train_dataloader()):
            now = time.perf_counter()
            if index == 0:
                first.append(now - start)
                mark, cpu_mark = now, time.process_time()
            else:
                tokens += int(batch["n_tokens"])
            dm.mark_consumed(batch)
        seconds += time.perf_counter() - mark
        cpu_seconds += time.process_time() - cpu_mark
    return tokens / seconds, tokens / cpu_seconds, max(first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window", type=int, default=32_768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--codec", default=None, help="codec name (default: the format's)")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--gpu-stage2", type=float, default=None,
                        help="GPU training tokens/s at 131,072-token windows (H200, paper-1.1b)")
    parser.add_argument("--gpu-stage1", type=float, default=None,
                        help="GPU training tokens/s at 2,048-token rows")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    result = {"bench": "loader", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "vocab": 202_048, "k": opts.k, "window": opts.window, "windows": opts.windows}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ds")
        t0 = time.perf_counter()
        manifest = write_synthetic_dataset(path, windows=opts.windows, window=opts.window,
                                           vocab_size=202_048, k=opts.k, mode="document",
                                           codec=opts.codec, windows_per_shard=2,
                                           doc_len=(64, 2048))
        result["write_s"] = round(time.perf_counter() - t0, 1)
        result["codec"] = manifest["codec"]["name"]
        result["bytes_per_token"] = manifest["totals"]["bytes"] / manifest["totals"]["tokens"]
        result["reader_tokens_per_s"] = rate_reader(path, opts.passes)
        for workers in [int(w) for w in opts.workers.split(",")]:
            for label, window, gpu in (("stage2", None, opts.gpu_stage2),
                                       ("stage1", 2048, opts.gpu_stage1)):
                rate, per_cpu, first = rate_loader(path, workers, window, opts.passes)
                key = f"loader_w{workers}_{label}"
                result[f"{key}_tokens_per_s"] = rate
                result[f"{key}_first_batch_s"] = first
                if gpu:
                    result[f"{key}_x_gpu"] = rate / gpu
                if workers == 0:
                    # On a loaded shared machine wall-clock rates swing; CPU time does not much.
                    result[f"{key}_tokens_per_cpu_s"] = per_cpu
                    if gpu:
                        result[f"{key}_cores_for_10x_gpu"] = 10 * gpu / per_cpu
    result["gpu_stage2_tokens_per_s"] = opts.gpu_stage2
    result["gpu_stage1_tokens_per_s"] = opts.gpu_stage1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
