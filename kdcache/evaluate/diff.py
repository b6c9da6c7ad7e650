"""Checkpoint diff (the paper's section 5): where do two checkpoints' query states differ?

Both models see the probe input (probe.py: the repeated block, `document-global`, float32) and we
record each layer's query states before and after RoPE at the R analysed rows. For a layer, with
qA, qB of shape [R, heads * head_dim]:

    by_dim[j]      = sqrt( sum_r (qA[r, j] - qB[r, j])^2 )   (distance per query dimension)
    by_position[r] = || qA[r] - qB[r] ||_2                    (distance per analysed position)

Dimension j belongs to head j // head_dim and RoPE pair i = (j mod head_dim) mod (head_dim / 2)
(half-split pairing), rotating with frequency theta^(-2i/head_dim): pair 0 fastest, the last
pair slowest. The paper finds stage-2 updates concentrated in high-index (slow) pairs and flat
across positions.
"""

from __future__ import annotations

from typing import Callable

from kdcache.evaluate.probe import ProbeConfig, build_block, run_mode
from kdcache.evaluate.models import EvalError, head_dim, load_model, rope_theta


def resolve_layers(spec: list[int] | None, num_layers: int) -> list[int]:
    layers = spec if spec else [0, num_layers - 1]
    out = []
    for layer in layers:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise EvalError(f"layer {layer} out of range for a model with {num_layers} layers")
        if index not in out:
            out.append(index)
    return out


def diff_checkpoints(path_a: str, path_b: str, cfg: ProbeConfig, layers: list[int] | None = None,
                     text: str | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    import torch

    a = load_model(path_a, device=cfg.device)
    b = load_model(path_b, device=cfg.device, need_tokenizer=False)
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        va, vb = getattr(a.config, attr, None), getattr(b.config, attr, None)
        if va != vb:
            raise EvalError(f"{path_a} and {path_b} differ in {attr} ({va} vs {vb}); the diff "
                            "compares checkpoints of one architecture")
    if head_dim(a.config) != head_dim(b.config):
        raise EvalError(f"{path_a} and {path_b} differ in head_dim")
    chosen = resolve_layers(layers, a.config.num_hidden_layers)
    block = build_block(a.tokenizer, path_a, cfg.block_tokens, text)
    runs = [run_mode(m, block, cfg, "document-global", "float32", progress=progress,
                     compute_kl=False) for m in (a, b)]
    hd = head_dim(a.config)
    result = {
        "models": [path_a, path_b], "names": [a.name, b.name],
        "head_dim": hd, "rope_theta": [rope_theta(a.config), rope_theta(b.config)],
        "block_tokens": cfg.block_tokens, "repeats": cfg.repeats,
        "positions": runs[0].positions,
        "pair_frequency": [[t ** (-2 * i / hd) for i in range(hd // 2)] if t else None
                           for t in (rope_theta(a.config), rope_theta(b.config))],
        "layers": {},
    }
    for layer in chosen:
        key = f"q_pre.{layer}"
        if key not in runs[0].captured:
            raise EvalError(f"layer {layer} has no RoPE query states (a NoPE layer?)")
        entry = {}
        for stage in ("pre", "post"):
            qa = runs[0].captured[f"q_{stage}.{layer}"]
            qb = runs[1].captured[f"q_{stage}.{layer}"]
            delta = qa - qb  # [R, heads * hd]
            by_dim = delta.pow(2).sum(0).sqrt()
            entry[f"{stage}_by_dim"] = by_dim.tolist()
            entry[f"{stage}_by_position"] = delta.norm(dim=1).tolist()
            top = torch.topk(by_dim, min(8, by_dim.numel())).indices.tolist()
            entry[f"{stage}_top_dims"] = [{"dim": j, "head": j // hd,
                                           "pair": (j % hd) % (hd // 2),
                                           "distance": float(by_dim[j])} for j in top]
            by_pair = by_dim.pow(2).view(-1, 2, hd // 2).sum((0, 1)).sqrt()  # [hd/2]
            entry[f"{stage}_by_pair"] = by_pair.tolist()
        result["layers"][str(layer)] = entry
    return result
