"""Format-valid synthetic datasets: for tests, benchmarks and GPU runs where no teacher runs.

Targets are peaked like a trained model's (a Zipf-like prior over ids plus per-row noise, top-1
probability around 0.3-0.6), not uniform noise, so codec and loader figures measured on them are
not flattering. Real figures come from real teachers (`kdcache codec eval`, BENCHMARKS.md).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdcache.formats.codecs import default_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.packing import default_valid
from kdcache.formats.reader import open_dataset
from kdcache.formats.window import WindowRecord
from kdcache.formats.writer import DatasetWriter


def synthetic_targets(rng: np.random.Generator, n: int, vocab_size: int, k: int, *,
                      kind: str = "topk", draws: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """ids [n, k] and values [n, k]: top-k log-probs (descending) or sampled weights."""
    k_eff = min(k, vocab_size)
    # Candidate ids concentrate on frequent (small) ids, as real teachers' do.
    cand = max(4 * k_eff, 256)
    ranks = np.minimum((rng.pareto(1.1, size=(n, cand)) * 50).astype(np.int64), vocab_size - 1)
    ids = np.empty((n, k_eff), dtype=np.int64)
    for r in range(n):  # distinct ids per row: first occurrences, topped up at random
        _, first = np.unique(ranks[r], return_index=True)
        u = ranks[r][np.sort(first)][:k_eff]  # distinct, in draw order
        if u.size < k_eff:
            extra = rng.choice(vocab_size, size=k_eff * 2 + 8, replace=False)
            u = np.unique(np.concatenate([u, extra]))[:k_eff]
        ids[r] = u
    # Frequent ids tend to rank high, but not in id order: a partial shuffle keeps that shape.
    noise = rng.exponential(scale=float(k_eff) / 4, size=(n, k_eff)) + np.arange(k_eff)
    ids = np.take_along_axis(ids, np.argsort(noise, axis=1), axis=1)
    logits = rng.gumbel(size=(n, k_eff)) * 1.5 - np.arange(k_eff) * 0.15
    order = np.argsort(-logits, axis=1)
    logits = np.take_along_axis(logits, order, axis=1)
    tail = rng.uniform(0.02, 0.2, size=(n, 1))  # probability mass outside the top-k
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) + np.log1p(-tail)
    if kind == "topk":
        return ids, logp.astype(np.float32)
    # sampled: `draws` draws from the (renormalised) distribution, stored as counts / draws
    p = np.exp(logp)
    p /= p.sum(axis=1, keepdims=True)
    out_ids = np.full((n, k_eff), -1, dtype=np.int64)
    out_w = np.zeros((n, k_eff), dtype=np.float32)
    for r in range(n):
        counts = rng.multinomial(draws, p[r])
        nz = np.flatnonzero(counts)
        out_ids[r, : nz.size] = ids[r, nz]
        out_w[r, : nz.size] = counts[nz] / draws
    return out_ids, out_w


def synthetic_window(rng: np.random.Generator, window_index: int, n: int, vocab_size: int, k: int,
                     *, mode: str = "document", kind: str = "topk",
                     doc_len: tuple[int, int] = (16, 512), bos_id: int = 1,
                     eos_id: int = 2) -> WindowRecord:
    """One packed window of BOS ... EOS documents with synthetic teacher targets."""
    lengths: list[int] = []
    total = 0
    while total < n:
        lengths.append(min(int(rng.integers(doc_len[0], doc_len[1] + 1)), n - total))
        total += lengths[-1]
    if lengths[-1] < 2 and len(lengths) > 1:
        last = lengths.pop()
        lengths[-1] += last
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(3, vocab_size, size=n) if vocab_size > 3 else rng.integers(0, vocab_size, n)
    if vocab_size > max(bos_id, eos_id):
        tokens[offsets[:-1]] = bos_id
        tokens[offsets[1:] - 1] = eos_id
    ids, values = synthetic_targets(rng, n, vocab_size, k, kind=kind)
    return WindowRecord(window_index=window_index, tokens=tokens, doc_offsets=offsets,
                        valid=default_valid(n, offsets, mode), ids=ids, values=values,
                        doc_ids=np.arange(len(lengths), dtype=np.int64) + window_index * 10_000,
                        doc_pieces=np.zeros(len(lengths), dtype=np.int32))


def write_synthetic_dataset(root: str | os.PathLike, *, windows: int, window: int,
                            vocab_size: int, k: int, mode: str = "document", kind: str = "topk",
                            codec: str | None = None, windows_per_shard: int = 4, seed: int = 0,
                            doc_len: tuple[int, int] = (16, 512),
                            codec_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a whole synthetic dataset; returns its manifest."""
    rng = np.random.default_rng(seed)
    header = DatasetHeader(
        kind=kind, k=k, vocab_size=vocab_size, codec=codec or default_codec(kind),
        codec_params=codec_params or {},
        packing={"window": window, "mode": mode, "bos_id": 1, "eos_id": 2, "seed": seed},
        teacher={"name": "synthetic", "config_hash": "synthetic", "tokenizer_hash": "synthetic"})
    with DatasetWriter(root, header, windows_per_shard=windows_per_shard) as writer:
        for i in range(windows):
            writer.add(synthetic_window(rng, i, window, vocab_size, k, mode=mode, kind=kind,
                                        doc_len=doc_len))
    return open_dataset(root).manifest
