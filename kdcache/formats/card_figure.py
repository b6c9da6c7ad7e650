"""The dataset card's figure: teacher entropy and top-1 probability, overall and by position.

Rows are sampled from a bounded number of windows spread over the dataset (random-access reads of
single record batches, so a remote dataset is not downloaded whole) and decoded with the
dataset's own codec. Entropy is over the stored ids only: for top-k targets it is a lower bound on
the teacher's full-vocabulary entropy (the tail's terms are left out), for sampled targets the
entropy of the sampled weights. Position is the number of tokens the teacher attended to for that
row: the window position + 1 in `causal` mode, the position in the document + 1 otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.ipc as ipc

from kdcache.formats import storage
from kdcache.formats.codecs import make_codec
from kdcache.formats.manifest import DatasetHeader
from kdcache.formats.shard import batch_fields

SAMPLE_WINDOWS = 32
SAMPLE_ROWS = 1 << 17


@dataclass
class TargetSample:
    entropy: np.ndarray  # float64 [rows], nats
    top1: np.ndarray  # float64 [rows]
    position: np.ndarray  # int64 [rows], tokens attended to (>= 1)
    windows: int  # windows the rows come from
    kind: str

    @property
    def rows(self) -> int:
        return int(self.entropy.shape[0])


def _row_stats(kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = values.astype(np.float64)
    if kind == "topk":
        p = np.exp(v)
        terms = -p * v
    else:
        p = v
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=1), p.max(axis=1)


def _positions(n: int, offsets: np.ndarray, mode: str) -> np.ndarray:
    rows = np.arange(n, dtype=np.int64)
    if mode == "causal":
        return rows + 1
    starts = np.asarray(offsets, dtype=np.int64)
    return rows - starts[np.searchsorted(starts, rows, side="right") - 1] + 1


def sample_targets(root: str, manifest: dict[str, Any], *, max_windows: int = SAMPLE_WINDOWS,
                   max_rows: int = SAMPLE_ROWS) -> TargetSample:
    """Decoded valid rows of up to `max_windows` windows spread evenly over the dataset."""
    fs, base = storage.resolve(root)
    header = DatasetHeader.from_manifest(manifest)
    entry = manifest["codec"].get("table")
    table = storage.read_bytes(fs, storage.join(base, entry["path"])) if entry else None
    codec = make_codec(header, table)
    shards = manifest["shards"]
    counts = np.array([s["windows"] for s in shards], dtype=np.int64)
    total = int(counts.sum())
    picks = np.unique(np.linspace(0, total - 1, min(max_windows, total)).round().astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(counts)])
    entropy, top1, position = [], [], []
    rows = windows = 0
    for s, shard in enumerate(shards):
        local = picks[(picks >= starts[s]) & (picks < starts[s + 1])] - starts[s]
        if local.size == 0 or rows >= max_rows:
            continue
        with fs.open(storage.join(base, shard["name"]), "rb") as fh:
            reader = ipc.open_file(fh)
            for j in local:
                f = batch_fields(reader.get_batch(int(j)))
                valid = f["valid"]
                _, values = codec.decode(f["targets"], int(valid.sum()))
                h, t = _row_stats(header.kind, values)
                entropy.append(h)
                top1.append(t)
                position.append(_positions(valid.shape[0], f["doc_offsets"],
                                           header.packing["mode"])[valid])
                rows += h.shape[0]
                windows += 1
                if rows >= max_rows:
                    break

    def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return TargetSample(cat(entropy, np.float64), cat(top1, np.float64),
                        cat(position, np.int64), windows, header.kind)


def _by_position(ax, x_edges: np.ndarray, position: np.ndarray, values: np.ndarray,
                 y_edges: np.ndarray, ylabel: str):
    """A 2-D histogram normalised per position bin (each column sums to 1), with the median."""
    hist, _, _ = np.histogram2d(position, values, bins=(x_edges, y_edges))
    col = hist.sum(axis=1, keepdims=True)
    share = np.divide(hist, col, out=np.zeros_like(hist), where=col > 0)
    mesh = ax.pcolormesh(x_edges, y_edges, share.T, cmap="Blues", vmin=0,
                         vmax=max(float(share.max()), 1e-9), shading="flat")
    idx = np.clip(np.searchsorted(x_edges, position, side="right") - 1, 0, len(x_edges) - 2)
    centres, medians, q1, q3 = [], [], [], []
    for b in range(len(x_edges) - 1):
        sel = values[idx == b]
        if sel.size:
            centres.append(np.sqrt(x_edges[b] * x_edges[b + 1]))
            lo, mid, hi = np.quantile(sel, [0.25, 0.5, 0.75])
            q1.append(lo), medians.append(mid), q3.append(hi)
    ax.plot(centres, medians, color="#d95f02", lw=2, label="median")
    ax.plot(centres, q1, color="#d95f02", lw=1, ls="--", label="quartiles")
    ax.plot(centres, q3, color="#d95f02", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens the teacher attended to)")
    ax.set_ylabel(ylabel)
    return mesh


def render_figure(sample: TargetSample, title: str) -> bytes:
    """PNG bytes: histograms of entropy and top-1 probability (top) and both by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entropy_label = ("entropy of the top-k ids (nats, lower bound)" if sample.kind == "topk"
                     else "entropy of the sampled weights (nats)")
    h_max = max(float(sample.entropy.max()), 1e-3) * 1.02
    with plt.rc_context({"font.size": 11}):
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
        axes[0, 0].hist(sample.entropy, bins=60, range=(0, h_max), color="#1b9e77")
        axes[0, 0].set_xlabel(entropy_label)
        axes[0, 0].set_ylabel("rows")
        axes[0, 1].hist(sample.top1, bins=40, range=(0, 1), color="#7570b3")
        axes[0, 1].set_xlabel("top-1 probability")
        axes[0, 1].set_ylabel("rows")
        top = max(int(sample.position.max()), 2)
        x_edges = np.unique(np.geomspace(1, top + 1, 25).round())
        if x_edges.size < 2:
            x_edges = np.array([1.0, top + 1.0])
        _by_position(axes[1, 0], x_edges, sample.position, sample.entropy,
                     np.linspace(0, h_max, 41), entropy_label.split(" (")[0] + " (nats)")
        mesh = _by_position(axes[1, 1], x_edges, sample.position, sample.top1,
                            np.linspace(0, 1, 41), "top-1 probability")
        fig.colorbar(mesh, ax=axes[1, :], label="share of the position's rows", shrink=0.9)
        handles, labels = axes[1, 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
        fig.suptitle(title)
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=100)
        plt.close(fig)
    return out.getvalue()
