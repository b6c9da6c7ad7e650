"""Codec benchmark: bytes per entry, KL and one-thread decode rate for each codec and k.

Prints one JSON line per (data, k, codec), the plain-zstd baseline (int32 ids + fp16 values)
measured in the same process beside each, and a first line describing the machine.

Data: --topk FILE.npz (default: /work/shared/data/dev_topk.npz when present, else a file made by
bench/make_topk_npz.py from a model it trains on local text). Besides the file as it is, a
V=202,048 *proxy*: the same rows with ids mapped into a 202,048-id space by a fixed random
injection, so that ids and the frequency table are full-size. It is a proxy (a real 202k-vocab
teacher spreads its mass differently); the table's bytes are reported amortised over the file
and over a 10M-token dataset.

    .venv/bin/python bench/bench_codec.py [--topk FILE.npz] [--ks 16,64,128] [--codecs raw,qrank]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from kdcache.formats.codec_eval import TopkFile, evaluate, load_topk_npz  # noqa: E402

SHARED_FILE = Path("/work/shared/data/dev_topk.npz")
PROXY_VOCAB = 202_048


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"bench": "codec", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def proxy(topk: TopkFile, vocab: int = PROXY_VOCAB, seed: int = 0) -> TopkFile:
    """The same rows with ids sent into [0, vocab) by a fixed random injection."""
    injection = np.random.default_rng(seed).choice(vocab, size=topk.vocab_size, replace=False)
    return TopkFile(f"{topk.path} (ids injected into V={vocab:,})", injection[topk.ids],
                    topk.logprobs, vocab)


def sampled_line(topk: TopkFile, draws: int = 50, k: int = 64, rows: int = 8192,
                 seed: int = 0) -> dict:
    """RS-KD-style sampled targets drawn from the file's renormalised top-k (counts / draws,
    ids by count descending): bytes per token of qrank (lossless, counts) and raw."""
    from kdcache.formats.codecs import QRankCodec, RawCodec

    assert k >= draws, "k >= draws keeps every drawn id, so weights stay exact counts / draws"
    rng = np.random.default_rng(seed)
    p = np.exp(topk.logprobs[:rows].astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    m = p.shape[0]
    ids = np.full((m, k), -1, dtype=np.int64)
    weights = np.zeros((m, k), dtype=np.float32)
    for r in range(m):
        counts = rng.multinomial(draws, p[r])
        nz = np.flatnonzero(counts)
        nz = nz[np.argsort(-counts[nz], kind="stable")][:k]
        ids[r, :nz.size] = topk.ids[r, nz]
        weights[r, :nz.size] = (counts[nz] / draws).astype(np.float32)
    table = QRankCodec.build_table(vocab_size=topk.vocab_size, sample_ids=ids[ids >= 0])
    codec = QRankCodec(kind="sampled", k=k, vocab_size=topk.vocab_size, table=table, draws=draws)
    blob = codec.encode(ids, weights)
    dec_ids, dec_w = codec.decode(blob, m)
    raw = RawCodec(kind="sampled", k=k, vocab_size=topk.vocab_size).encode(ids, weights)
    n_ids = int((ids >= 0).sum())
    return {"codec": "qrank", "kind": "sampled", "draws": draws, "k": k, "tokens": m,
            "vocab_size": topk.vocab_size, "ids_per_token": n_ids / m,
            "bytes_per_token": (len(blob) + len(table)) / m,
            "bytes_per_id": (len(blob) + len(table)) / n_ids, "table_bytes": len(table),
            "lossless": bool(np.array_equal(dec_ids, ids) and np.array_equal(dec_w, weights)),
            "raw_bytes_per_token": len(raw) / m}


def default_topk() -> str:
    if SHARED_FILE.exists():
        return str(SHARED_FILE)
    out = Path("/tmp/kdcache_bench_topk.npz")
    if not out.exists():
        script = Path(__file__).with_name("make_topk_npz.py")
        subprocess.run([sys.executable, str(script), "--out", str(out)], check=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topk", default=None)
    ap.add_argument("--ks", default="16,64,128")
    ap.add_argument("--codecs", default="raw,qrank")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--no-proxy", action="store_true")
    args = ap.parse_args()
    path = args.topk or default_topk()
    print(json.dumps(machine()), flush=True)
    full = load_topk_npz(path)
    for k in [int(x) for x in args.ks.split(",")]:
        if k > full.ids.shape[1]:
            continue
        base = TopkFile(full.path, full.ids[:, :k], full.logprobs[:, :k], full.vocab_size)
        datasets = [("file", base)] + ([] if args.no_proxy else [("proxy-V202048", proxy(base))])
        for data_name, data in datasets:
            for codec in args.codecs.split(","):
                r = evaluate(data, codec, window=args.window, repeats=args.repeats)
                r["data"] = data_name
                print(json.dumps(r), flush=True)
            print(json.dumps({
                "codec": "zstd-int32-fp16 (baseline)", "data": data_name, "k": k,
                "vocab_size": data.vocab_size, "tokens": r["tokens"],
                "bytes_per_entry": r["zstd_bytes_per_entry"],
                "decode_tokens_per_s": r["zstd_decode_tokens_per_s"]}), flush=True)
    print(json.dumps(sampled_line(full)), flush=True)


if __name__ == "__main__":
    main()
