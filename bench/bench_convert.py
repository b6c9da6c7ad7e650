"""`kdcache convert --from distillkit`: throughput, and how far the converted targets are from the
DistillKit-decoded originals.

    python bench/bench_convert.py [--samples 48] [--length 1024] [--rounds 3]

Writes a DistillKit dataset in the layout of its README's DistributionQuantizationConfig example
(d=128,256, k=128, exact_k=16 bf16, tail polynomial [0, 1, 2, sqrt], residual bins 16 x 8-bit
and 64 x 2-bit) from synthetic teacher-like top-128 rows (kdcache.formats.synthetic), using the
test suite's writer (tests/formats/distillkit_sample.py). Then, rounds interleaved (median):

  decode   read the Parquet files and decode every row as DistillKit does (the baseline: what
           reading the DistillKit dataset costs anyway), tokens/s
  convert  the whole conversion into a kdcache dataset with qrank (default) and raw: tokens/s

and, per codec, the KL(original || converted) in nats per row of the top-k distributions (both
renormalised over the original's k ids), mean and 99th percentile. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.formats.convert import distillkit  # noqa: E402
from kdcache.formats.convert.common import RepairCounts  # noqa: E402
from kdcache.formats.reader import open_dataset  # noqa: E402
from kdcache.formats.synthetic import synthetic_targets  # noqa: E402
from tests.formats import distillkit_sample as dks  # noqa: E402

CONFIG = {"d": 128_256, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16",
          "delta_encoding": False, "error_diffusion": False, "normalize_t": False,
          "polynomial_terms": [0, 1, 2, "sqrt"], "term_dtype": "float32",
          "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 16},
                            {"scale_dtype": "float32", "element_bits": 2, "num_elements": 64}]}


def _kl_against_original(folder: str, out: str) -> dict:
    cfg = distillkit.read_config(os.path.join(folder, distillkit.CONFIG_NAME))
    originals = {d.doc_id: d for d in distillkit.iter_documents(folder, cfg, RepairCounts(),
                                                                 cfg.d)}
    kls = []
    ds = open_dataset(out)
    for w in ds.iter_windows():
        offsets = w.doc_offsets.numpy()
        for d, start in enumerate(offsets[:-1]):
            doc = originals[int(w.doc_ids[d])]
            m = doc.ids.shape[0]
            got_ids = w.ids.numpy()[start:start + m]
            got_lp = w.logprobs.numpy()[start:start + m].astype(np.float64)
            order = np.argsort(got_ids, axis=1)
            sorted_ids = np.take_along_axis(got_ids, order, 1)
            pos = np.stack([np.searchsorted(r, q) for r, q in zip(sorted_ids, doc.ids)])
            pos = np.minimum(pos, sorted_ids.shape[1] - 1)
            found = np.take_along_axis(sorted_ids, pos, 1) == doc.ids
            q_lp = np.where(found, np.take_along_axis(np.take_along_axis(got_lp, order, 1), pos,
                                                      1), got_lp.min(axis=1, keepdims=True))
            p = np.exp(doc.logprobs.astype(np.float64))
            p /= p.sum(1, keepdims=True)
            q = np.exp(q_lp)
            q /= q.sum(1, keepdims=True)
            kls.append((p * (np.log(p) - np.log(q))).sum(1)[doc.keep])
    kl = np.concatenate(kls)
    return {"rows": int(kl.size), "kl_mean": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kdcache-bench-convert-")
    try:
        rng = np.random.default_rng(0)
        samples = []
        for _ in range(args.samples):
            ids, lps = synthetic_targets(rng, args.length - 1, CONFIG["d"], CONFIG["k"])
            samples.append((rng.integers(0, CONFIG["d"], size=args.length), ids, lps))
        folder = os.path.join(tmp, "distillkit")
        dks.write_sample(folder, CONFIG, samples, rows_per_file=16)
        tokens = args.samples * args.length
        cfg = distillkit.read_config(os.path.join(folder, distillkit.CONFIG_NAME))
        times: dict[str, list[float]] = {"decode": [], "convert_qrank": [], "convert_raw": []}
        outs = {}
        for r in range(args.rounds + 1):  # round 0: warm-up (numba compilation, page cache)
            t0 = time.perf_counter()
            for _ in distillkit.iter_documents(folder, cfg, RepairCounts(), cfg.d):
                pass
            if r:
                times["decode"].append(time.perf_counter() - t0)
            for codec in ("qrank", "raw"):
                out = os.path.join(tmp, f"{codec}-{r}")
                t0 = time.perf_counter()
                summary = distillkit.convert_distillkit(folder, out, codec=codec)
                if r:
                    times[f"convert_{codec}"].append(time.perf_counter() - t0)
                outs[codec] = out
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "bench": "convert_distillkit", "samples": args.samples, "tokens": tokens,
            "config": "DistillKit README DistributionQuantizationConfig (k=128, d=128256)",
            "decode_tokens_per_s": round(tokens / med["decode"], 1),
            "convert_qrank_tokens_per_s": round(tokens / med["convert_qrank"], 1),
            "convert_raw_tokens_per_s": round(tokens / med["convert_raw"], 1),
            "convert_qrank_over_decode": round(med["decode"] / med["convert_qrank"], 3),
            "rows_changed": summary["rows_changed"],
            "kl_qrank": _kl_against_original(folder, outs["qrank"]),
            "kl_raw": _kl_against_original(folder, outs["raw"]),
            "bytes_per_token": {
                "distillkit": round(sum(os.path.getsize(os.path.join(folder, f))
                                        for f in os.listdir(folder)) / tokens, 2),
                **{c: round(open_dataset(o).manifest["totals"]["bytes"] / tokens, 2)
                   for c, o in outs.items()}},
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
