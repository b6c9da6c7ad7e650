"""PNG plots for the probe and the checkpoint diff (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from typing import Any

from kdcache.evaluate.report import save_figure
from kdcache.evaluate.rope_plan import men_decay, pair_frequencies

KL_FLOOR = 1e-12  # KL values of exactly 0 are drawn at this floor on log axes
COS_FLOOR = 1e-9  # 1 - cosine below this (float32 rounding) is drawn at the floor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positions_k(positions: list[int]) -> list[float]:
    return [p / 1000 for p in positions]


def plot_query_element(summary: dict, run: Any, path: str) -> str:
    plt = _plt()
    el = summary["primary"]["query_element"]
    x = _positions_k(run.positions)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, el["pre_distance"], "o-", ms=3, label="pre-RoPE")
    ax.plot(x, el["post_distance"], "s-", ms=3, label="post-RoPE")
    ax.set_xlabel("global position of the analysed token (thousands)")
    ax.set_ylabel("|q[r] - q[0]|, one element")
    ax.set_title(f"Query element {el['index']} (head {el['head']}, RoPE pair {el['pair']}), "
                 f"layer {el['layer']}: distance to repeat 0", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_query_cosine(summary: dict, run: Any, layer: int, path: str) -> str:
    plt = _plt()
    x = _positions_k(run.positions)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(x, run.query_pre_cosine[str(layer)], "o-", ms=3, label="pre-RoPE")
    ax.plot(x, run.query_post_cosine[str(layer)], "s-", ms=3, label="post-RoPE")
    ax.set_xlabel("global position of the analysed token (thousands)")
    ax.set_ylabel("cosine similarity to repeat 0")
    ax.set_title(f"Query state, layer {layer} ({run.mode}, {run.dtype})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_layer_cosine(run: Any, path: str) -> str:
    """1 - cosine similarity to repeat 0 on a log axis: under a document mask the differences are
    often 1e-7..1e-2, invisible on a linear cosine axis."""
    plt = _plt()
    x = _positions_k(run.positions)
    keys = list(run.layer_cosine)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for j, key in enumerate(keys):
        label = key if key in ("embeddings", "final") else f"layer {key}"
        y = [max(1.0 - c, COS_FLOOR) for c in run.layer_cosine[key]][1:]
        ax.plot(x[1:], y, "-", marker=".", lw=1.2, color=cmap(j / max(1, len(keys) - 1)),
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("global position of the analysed token (thousands)")
    ax.set_ylabel(f"1 - cosine similarity to repeat 0 (floor {COS_FLOOR:g})")
    ax.set_title(f"Hidden state after each layer ({run.mode}, {run.dtype})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(keys) <= 12 else 3, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_top_tokens(summary: dict, run: Any, path: str) -> str:
    plt = _plt()
    table = summary["primary"]["top_tokens"]
    x = _positions_k(run.positions)
    fig, (ax_p, ax_r) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    cmap = plt.get_cmap("tab10")
    prob = list(zip(*table["prob"]))
    rank = list(zip(*table["rank"]))
    for j, token in enumerate(table["tokens"]):
        label = f"{j}: {token!r}"
        ax_p.plot(x, prob[j], "-", color=cmap(j % 10), label=label)
        ax_r.plot(x, [r + 1 for r in rank[j]], "-", color=cmap(j % 10))
    ax_p.set_ylabel("probability")
    ax_p.set_title(f"Repeat 0's top-{len(table['tokens'])} next tokens across positions "
                   f"({run.mode}, {run.dtype})", fontsize=10)
    ax_p.legend(fontsize=7, ncol=2, loc="upper right")
    ax_r.set_ylabel("rank (1 = most likely)")
    ax_r.invert_yaxis()
    ax_r.set_xlabel("global position of the analysed token (thousands)")
    for ax in (ax_p, ax_r):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_kl(summary: dict, runs: list[Any], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    colors = {"document-global": "tab:blue", "document": "tab:green", "causal": "tab:red"}
    n = summary["config"]["block_tokens"]
    for run in runs:
        x = [r * n / 1000 for r in range(1, len(run.kl_mean))]
        y = [max(v, KL_FLOOR) for v in run.kl_mean[1:]]
        ax.plot(x, y, styles.get(run.dtype, "-"), color=colors.get(run.mode), marker=".",
                label=f"{run.mode}, {run.dtype}")
    ax.set_yscale("log")
    ax.set_xlabel("start of repeat r (thousands of tokens into the window)")
    ax.set_ylabel(f"mean KL(p_0 || p_r) per token (nats; 0 drawn at {KL_FLOOR:g})")
    ax.set_title("Output drift against repeat 0, by packing mode and dtype", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_diff_dims(result: dict, layer: str, path: str) -> str:
    plt = _plt()
    data = result["layers"][layer]
    hd = result["head_dim"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for ax, stage in zip(axes, ("pre", "post")):
        values = data[f"{stage}_by_dim"]
        dims = list(range(len(values)))
        pair = [(d % hd) % (hd // 2) for d in dims]
        points = ax.scatter(dims, values, c=pair, cmap="plasma", s=6)
        for head_start in range(0, len(values), hd):
            ax.axvline(head_start, color="grey", lw=0.5, alpha=0.5)
        ax.set_ylabel(f"L2 distance, {stage}-RoPE")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{result['names'][0]} vs {result['names'][1]}, query states, layer "
                      f"{layer}: distance per dimension (grey lines: head starts)", fontsize=10)
    axes[1].set_xlabel("query dimension (head * head_dim + index in head)")
    bar = fig.colorbar(points, ax=axes, fraction=0.03, pad=0.02)
    bar.set_label(f"RoPE pair i (0: fastest; wavelength 2*pi*theta^(2i/{hd}))")
    return save_figure(fig, path)


def plot_diff_positions(result: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = [p / 1000 for p in result["positions"]]
    for layer, data in result["layers"].items():
        ax.plot(x, data["pre_by_position"], "-", marker=".", label=f"layer {layer}, pre-RoPE")
        ax.plot(x, data["post_by_position"], "--", marker=".", label=f"layer {layer}, post-RoPE")
    ax.set_xlabel("global position of the analysed token (thousands)")
    ax.set_ylabel("L2 distance of query states")
    ax.set_title(f"{result['names'][0]} vs {result['names'][1]}: distance per position",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_rope_plan(result: dict, path: str) -> str:
    """Per stage: Men et al.'s B(m) for the given theta and for the lowest valid theta (left);
    wavelength of each dimension pair against the context (right)."""
    import numpy as np

    plt = _plt()
    d = result["head_dim"]
    fig, (ax_b, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab10")
    for j, stage in enumerate(result["stages"]):
        L = stage["context"]
        m = np.unique(np.geomspace(1, L, 2000).astype(np.int64))
        color = cmap(j % 10)
        if stage["theta"]:
            ax_b.plot(m, men_decay(d, stage["theta"], m), "-", color=color, lw=1,
                      label=f"L={L}, theta={stage['theta']:.3g}")
            ax_w.plot(range(d // 2), 2 * np.pi / pair_frequencies(d, stage["theta"]), "o-",
                      ms=3, color=color, label=f"theta={stage['theta']:.3g}")
        ax_b.plot(m, men_decay(d, stage["theta_lower_bound"], m), "--", color=color, lw=1,
                  label=f"L={L}, lowest valid {stage['theta_lower_bound']:.3g}")
        ax_w.axhline(L, color=color, ls=":", lw=1, label=f"context {L}")
    ax_b.axhline(0, color="black", lw=0.8)
    ax_b.set_xscale("log")
    ax_b.set_xlabel("relative distance m (tokens)")
    ax_b.set_ylabel("B(m) = sum_i cos(m * theta_i)")
    ax_b.set_title(f"Men et al. bound: B(m) >= 0 for m <= L (head dim {d})", fontsize=10)
    ax_b.legend(fontsize=7)
    ax_w.set_yscale("log")
    ax_w.set_xlabel("dimension pair i (0: fastest)")
    ax_w.set_ylabel("wavelength 2*pi*theta^(2i/d) (tokens)")
    ax_w.set_title("Wavelength per pair vs context", fontsize=10)
    ax_w.legend(fontsize=7)
    for ax in (ax_b, ax_w):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
