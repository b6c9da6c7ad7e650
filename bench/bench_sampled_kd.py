"""RS-KD sampled targets against top-k at equal bytes: gradient angle to full-vocabulary KD.

    python bench/bench_sampled_kd.py [--train-seconds 10] [--windows 4]

Toy teacher: `make-teacher --preset tiny` trained for --train-seconds (V = 1,024), its full
next-token distributions p on built-in windows (transformers, fp32, CPU). Student: q = softmax of
the teacher's logits * 0.7 + N(0, 1) noise (a student near, not at, the teacher). Gradients of
KL(target || q) with respect to the student's logits, all rows flattened:

- full KD:            q - p (the reference);
- top-k (renormalised, the loss's `renormalize` mode): zero outside the top-k set S,
  q_S / q(S) - p_S / p(S) on it;
- sampled (RS-KD):    q - c / N, c the counts of N draws from p (unbiased: E[c / N] = p), drawn
  the way the dump draws them (torch.multinomial, replacement).

Bytes per token: the qrank blob of each target (its rank table fitted on the same ids, as a dump
fits it on the first window; sampled weights stored as exact counts). Prints one JSON line per
(kind, size) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def teacher_distributions(train_seconds: float, windows: int):
    import torch
    from transformers import AutoModelForCausalLM

    from kdcache.teacher_dump.corpus import CorpusSpec, CorpusStats, iter_documents
    from kdcache.teacher_dump.make_teacher import TeacherConfig, build_teacher
    from kdcache.teacher_dump.pack import PackConfig, PackStats, TeacherTokenizer, pack_documents

    model_dir = os.path.join(tempfile.mkdtemp(prefix="kdcache-rskd-"), "tiny")
    build_teacher(model_dir, TeacherConfig.preset("tiny", train_seconds=train_seconds),
                  log=lambda m: None)
    tok = TeacherTokenizer(model_dir)
    docs = iter_documents(CorpusSpec("builtin", builtin_documents=64, builtin_seed=7),
                          CorpusStats())
    wins = []
    for w in pack_documents(docs, tok, PackConfig(window=512, seed=3), PackStats()):
        wins.append(w)
        if len(wins) == windows:
            break
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = torch.cat([model(input_ids=torch.as_tensor(w.tokens, dtype=torch.long)[None])
                            .logits[0, :-1] for w in wins])
    return logits.double()


def qrank_bytes(kind: str, ids: np.ndarray, values: np.ndarray, vocab: int, k: int,
                draws: int | None = None) -> int:
    from kdcache.formats.codecs.qrank import QRankCodec

    real = ids[ids >= 0]
    table = QRankCodec.build_table(vocab_size=vocab, sample_ids=real)
    params = {"draws": draws} if draws else {}
    codec = QRankCodec(kind=kind, k=k, vocab_size=vocab, table=table, **params)
    return len(codec.encode(ids, values.astype(np.float32))) + len(table or b"")


def cosine(a, b) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=10.0)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()

    z = teacher_distributions(args.train_seconds, args.windows)
    n, vocab = z.shape
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(z, -1)
    q = torch.softmax(z * 0.7 + torch.randn(z.shape, generator=gen, dtype=z.dtype), -1)
    g_full = q - p
    rows = []
    for k in (2, 4, 8, 16, 32, 64):  # k = 1 renormalised is exactly 0: no gradient
        vals, idx = z.topk(k, -1)
        mask = torch.zeros_like(p).scatter_(1, idx, 1.0)
        p_s, q_s = p * mask, q * mask
        g = q_s / q_s.sum(-1, keepdim=True) - p_s / p_s.sum(-1, keepdim=True)
        lp = (vals - torch.logsumexp(z, -1, keepdim=True)).float().numpy()
        size = qrank_bytes("topk", idx.numpy().astype(np.int64), lp, vocab, k)
        rows.append({"kind": "topk", "k": k, "bytes_per_token": round(size / n, 2),
                     "cos_to_full_kd": round(cosine(g, g_full), 4)})
    for draws in (1, 2, 4, 8, 16, 32, 64, 128):
        sample = torch.multinomial(p.float(), draws, replacement=True, generator=gen)
        counts = torch.zeros_like(p).scatter_add_(1, sample, torch.ones_like(sample, dtype=p.dtype))
        g = q - counts / draws
        cnt, cid = counts.topk(min(draws, vocab), -1)
        ids = torch.where(cnt > 0, cid, -1).numpy().astype(np.int64)
        weights = (cnt / draws).float().numpy()
        size = qrank_bytes("sampled", ids, weights, vocab, draws, draws=draws)
        rows.append({"kind": "sampled", "draws": draws, "bytes_per_token": round(size / n, 2),
                     "distinct_per_row": round(float((cnt > 0).sum(-1).double().mean()), 2),
                     "cos_to_full_kd": round(cosine(g, g_full), 4)})
    for r in rows:
        r["angle_deg"] = round(float(np.degrees(np.arccos(np.clip(r["cos_to_full_kd"], -1, 1)))),
                               2)
        print(json.dumps({"bench": "sampled_kd", "tokens": n, "vocab_size": vocab, **r}))
    print(json.dumps({"bench": "sampled_kd_summary", "tokens": n, "vocab_size": vocab,
                      "teacher_entropy_nats": round(float(-(p * torch.log(p + 1e-30)).sum(-1)
                                                          .mean()), 3)}))


if __name__ == "__main__":
    main()
