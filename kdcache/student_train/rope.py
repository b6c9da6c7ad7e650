"""Rotary position embedding (RoPE), the Hugging Face Llama convention.

A head vector x of size h is split in two halves (x1, x2); pair j = (x1[j], x2[j]) is rotated by
the angle  pos * theta^(-2j/h),  j = 0 .. h/2-1:

    rope(x) = x * cos(angle) + rotate_half(x) * sin(angle),   rotate_half(x) = (-x2, x1)

The half-split pairing (not interleaved pairs) is what `LlamaForCausalLM` does, so a student saved
as an HF directory computes the same function in transformers and vLLM. Angles are computed in
float32 from integer positions: at 131,072 positions and theta 10k the largest angles are ~1.3e5
rad, where bf16 would lose all phase.

Phase-wise RoPE (the paper's 10k -> 500k) is nothing more than a different `theta` in the next
stage's config: the weights carry over, the rotation spectrum changes.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2j/h) for j = 0 .. h/2-1, float32 [h/2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, [B, T, h] each (both halves repeated)."""
    inv_freq = inverse_frequencies(head_dim, theta, device=positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, h/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, h)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, h] by cos/sin [B, T, h]."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def positions_for(seg_ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Position ids [B, T] for a batch whose segment (document) ids are `seg_ids` [B, T].

    `global`: 0 .. T-1 over the whole window (the paper: documents isolated by the mask, the
    position still counts over the window). `reset`: each document counts from 0, as the teacher
    saw it when run per document.
    """
    batch, length = seg_ids.shape
    arange = torch.arange(length, device=seg_ids.device).expand(batch, length)
    if mode == "global":
        return arange
    if mode != "reset":
        raise ValueError(f"positions must be 'global' or 'reset', got {mode!r}")
    # position = index - index of the segment's first token
    starts = torch.ones_like(seg_ids, dtype=torch.bool)
    starts[:, 1:] = seg_ids[:, 1:] != seg_ids[:, :-1]
    start_index = torch.where(starts, arange, torch.zeros_like(arange))
    start_index = torch.cummax(start_index, dim=1).values
    return arange - start_index
