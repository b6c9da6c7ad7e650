"""`kdcache eval lm`: held-out perplexity and KL to the teacher's stored targets (Figure 5's
counterpart: what long-context training costs elsewhere).

Each window of a kdcache logit dataset is run through the model with the dataset's own packing
mode (recorded in its manifest): `causal` as one forward; `document` and `document-global` each
document as its own sequence with position_ids from 0 or from the document's offset in the window
(exact for a document mask, no N x N mask), many documents per forward as a padded batch. Row i (valid rows only, FORMAT.md) predicts token i+1:

    CE_i = -log p(x_{i+1})                                         -> perplexity exp(mean CE)
    KL_i = sum_{v in K} q_v log(q_v / p_v) + q_tail log(q_tail / p_tail)

with q the teacher's stored top-k probabilities (full-vocabulary normalised, temperature 1),
q_tail = 1 - sum_K q_v, and p_tail = 1 - sum_K p_v: the KL between teacher and student after
merging every token outside the teacher's top-k into one "tail" outcome. It is a proper KL (>= 0,
0 only when the two agree on K and the tail) and a lower bound on the full-vocabulary KL. For
`sampled` targets q is the stored weights (no tail). Both are also reported per position bucket
(eighths of the window), since the paper's concern is position.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Callable, Sequence

from kdcache.errors import KdcacheError
from kdcache.evaluate.capture import find_decoder
from kdcache.evaluate.models import EvalError, load_model, unique_labels
from kdcache.evaluate.probe import logprobs_from_hidden
from kdcache.evaluate.report import save_figure
from kdcache.formats.packing import request_segments
from kdcache.formats.reader import open_dataset

POSITION_BUCKETS = 8
_ROW_CHUNK = 1024
_BATCH_TOKENS = 16384  # padded tokens per forward when a window's documents are batched


def _segment_batches(segments: list[tuple[int, int, int]], budget: int,
                     ) -> list[list[tuple[int, int, int]]]:
    """Segments grouped into batches of at most `budget` padded tokens, longest first (so each
    batch pads little): one forward per batch instead of one per document."""
    order = sorted(segments, key=lambda s: s[0] - s[1])
    batches: list[list[tuple[int, int, int]]] = []
    for seg in order:
        if batches and (len(batches[-1]) + 1) * (batches[-1][0][1] - batches[-1][0][0]) <= budget:
            batches[-1].append(seg)
        else:
            batches.append([seg])
    return batches


def window_metrics(model: Any, window: Any, mode: str, kind: str, device: str = "cpu",
                   ) -> tuple[Any, Any, Any]:
    """(row index, CE, KL) float64 tensors over the window's valid rows that have a next token.

    Each request of the window (request_segments) runs from its own first position; several
    requests share a forward as right-padded rows of one batch (causal attention: a row's real
    tokens never see its padding, so this is the same computation as one request at a time)."""
    import torch

    decoder = find_decoder(model)
    tokens = window.tokens.long()
    n = tokens.shape[0]
    valid = window.valid.clone()
    valid[n - 1] = False
    segments = [seg for seg in request_segments(n, window.doc_offsets.tolist(), mode)
                if bool(valid[seg[0]:seg[1]].any())]
    if not segments:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty.long(), empty, empty
    rows_all, hidden_all = [], []
    for batch in _segment_batches(segments, budget=max(n, _BATCH_TOKENS)):
        width = batch[0][1] - batch[0][0]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (start, end, pos0) in enumerate(batch):
            ids[b, :end - start] = tokens[start:end]
            positions[b] = torch.arange(pos0, pos0 + width)
        with torch.no_grad():
            hidden = decoder(input_ids=ids.to(device), position_ids=positions.to(device),
                             use_cache=False).last_hidden_state
        for b, (start, end, _) in enumerate(batch):
            seg_rows = torch.nonzero(valid[start:end]).flatten()
            rows_all.append(seg_rows + start)
            hidden_all.append(hidden[b, seg_rows.to(device)])
    order = torch.argsort(torch.cat(rows_all))
    rows_sorted = torch.cat(rows_all)[order]
    hidden_rows = torch.cat(hidden_all)[order.to(device)]
    ce_all, kl_all = [], []
    for c in range(0, rows_sorted.numel(), _ROW_CHUNK):
        rows = rows_sorted[c:c + _ROW_CHUNK]
        with torch.no_grad():
            lp = logprobs_from_hidden(model, hidden_rows[c:c + _ROW_CHUNK]).double().cpu()
        target = window.tokens[rows + 1].long()
        ce = -lp.gather(1, target[:, None])[:, 0]
        ids = window.ids[rows].long()
        present = ids >= 0
        q = (window.logprobs[rows].double().exp() if kind == "topk"
             else window.weights[rows].double())
        q = torch.where(present, q, torch.zeros_like(q))
        p_k = torch.where(present, lp.gather(1, ids.clamp_min(0)), torch.full_like(q, -math.inf))
        term = torch.where(q > 0, q * (q.log() - p_k), torch.zeros_like(q)).sum(1)
        q_tail = (1 - q.sum(1)).clamp_min(0)
        p_tail = (1 - p_k.exp().sum(1)).clamp_min(1e-30)
        tail = torch.where(q_tail > 1e-12, q_tail * (q_tail.log() - p_tail.log()),
                           torch.zeros_like(q_tail))
        ce_all.append(ce)
        kl_all.append((term + tail).clamp_min(0))
    return rows_sorted, torch.cat(ce_all), torch.cat(kl_all)


def evaluate_lm(model_paths: Sequence[str], data: str, max_windows: int | None = None,
                dtype: str = "float32", device: str = "cpu",
                progress: Callable[[int], None] | None = None,
                last_windows: int | None = None) -> dict:
    """Perplexity and KL to the teacher of each model over the first `max_windows` windows, or
    over the last `last_windows` (the ones `kdcache train --holdout-windows` kept out)."""
    import numpy as np

    try:
        ds = open_dataset(data)
    except KdcacheError:
        raise
    except (OSError, ValueError) as exc:
        raise EvalError(f"{data}: cannot open as a kdcache dataset: {exc}") from None
    mode = ds.packing.get("mode")
    if last_windows is not None and max_windows is not None:
        raise EvalError("give --max-windows or --last-windows, not both")
    if last_windows is not None and not 0 < last_windows <= len(ds):
        raise EvalError(f"{data}: --last-windows {last_windows} must be in [1, {len(ds)}]")
    if last_windows is not None:
        first, end = len(ds) - last_windows, len(ds)
    else:
        first, end = 0, len(ds) if max_windows is None else min(len(ds), max_windows)
    count = end - first
    if count <= 0:
        raise EvalError(f"{data}: dataset has no windows")
    window_len = int(ds.packing.get("window") or max(ds.window_lengths[first:end]))
    result = {"data": data, "packing_mode": mode, "kind": ds.kind, "k": ds.k,
              "teacher": ds.header.teacher, "windows": count, "window_range": [first, end],
              "teacher_temperature": ds.header.temperature, "models": []}
    for path, label in zip(model_paths, unique_labels(model_paths)):
        loaded = load_model(path, dtype=dtype, device=device, need_tokenizer=False)
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        ce_sum = kl_sum = 0.0
        rows_total = 0
        buckets: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for i in range(first, end):
            window = ds[i]
            top = int(window.ids.max())
            if top >= vocab or int(window.tokens.max()) >= vocab:
                raise EvalError(f"{data}: window {i} has token/target id {max(top, int(window.tokens.max()))} "
                                f"but {path} has a vocabulary of {vocab} (different tokenizer?)")
            rows, ce, kl = window_metrics(loaded.model, window, mode, ds.kind, device)
            ce_sum += float(ce.sum())
            kl_sum += float(kl.sum())
            rows_total += int(rows.numel())
            bucket = np.minimum(rows.numpy() * POSITION_BUCKETS // window_len, POSITION_BUCKETS - 1)
            for b in range(POSITION_BUCKETS):
                sel = bucket == b
                if sel.any():
                    buckets[b][0] += float(ce[sel].sum())
                    buckets[b][1] += float(kl[sel].sum())
                    buckets[b][2] += int(sel.sum())
            if progress:
                progress(1)
        mean_ce = ce_sum / max(1, rows_total)
        result["models"].append({
            "model": path, "name": label, "rows": rows_total,
            "cross_entropy": mean_ce, "perplexity": math.exp(mean_ce),
            "kl_to_teacher": kl_sum / max(1, rows_total),
            "by_position": [{"bucket": b, "start": b * window_len // POSITION_BUCKETS,
                             "rows": v[2], "cross_entropy": v[0] / v[2], "kl_to_teacher": v[1] / v[2]}
                            for b, v in sorted(buckets.items())],
        })
    return result


def plot_lm(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in result["models"]:
        x = [b["start"] / 1000 for b in m["by_position"]]
        ax_ce.plot(x, [math.exp(b["cross_entropy"]) for b in m["by_position"]], "o-",
                   label=f"{m['name']} (ppl {m['perplexity']:.3g})")
        ax_kl.plot(x, [b["kl_to_teacher"] for b in m["by_position"]], "o-",
                   label=f"{m['name']} (KL {m['kl_to_teacher']:.3g})")
    ax_ce.set_ylabel("perplexity")
    ax_kl.set_ylabel("KL(teacher || model), nats/token")
    for ax in (ax_ce, ax_kl):
        ax.set_xlabel("position in window (thousands of tokens, bucket start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Held-out {result['packing_mode']} windows of {os.path.basename(os.path.normpath(result['data']))}",
                 fontsize=10)
    return save_figure(fig, path)
