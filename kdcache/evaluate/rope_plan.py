"""RoPE planner: how large must theta be for a context length, and which pairs did training see?

Conventions (Hugging Face Llama, half-split pairs): head dimension d, pair i = 0 .. d/2-1 rotates
by the angle  m * theta_i  at relative distance m, with  theta_i = theta^(-2i/d)  (pair 0 fastest).

**Men et al. 2024, "Base of RoPE Bounds Context Length".** The criterion is the long-term decay
of the ability to attend more to a similar token than to a random one, which is proportional to

    B(m; theta) = sum_{i=0}^{d/2-1} cos(m * theta_i)

A base theta supports context length L when B(m; theta) >= 0 for every integer m in [0, L].
The set of valid bases is not an interval (B dips below zero again for some bases above the
first valid one), so "lowest" is defined on a grid: bases 10^(k/100) for k = 200 .. 1200
(1e2 .. 1e12, 100 points per decade, step ratio 1.0233) are scanned in increasing order and
`theta_lower_bound` is the **first** grid base that satisfies the criterion. That is what
reproduces the paper's table (head dim 128: 2k 1.6e4, 8k 8.4e4, 32k 6.4e5, 128k 7.8e6; we get
1.38e4, 9.12e4, 6.31e5, 8.91e6, all within 1.2x; tests allow 1.6x, the spread between the paper
and a later reproduction). We also report `theta_valid_from`: the first grid base from which all
grid bases up to 10x `theta_lower_bound` are valid (with --robust: a scan of ~100 more bases),
a safer choice when the exact bound matters.

**Liu et al. 2024, "Scaling Laws of RoPE-based Extrapolation".** A pair has seen a whole period
during training on T_train tokens when its wavelength 2*pi*theta^(2i/d) <= T_train; the number of
such dimensions (the critical dimension) is

    d_extra = 2 * ceil((d/2) * log_theta(T_train / (2*pi)))

(the paper writes it for theta = 10000: d_extra = 2*ceil((d/2) * log_10000(T_train/(2*pi))),
92 for Llama 2, d=128, T_train=4096). Dimensions beyond d_extra never saw a full period; the
paper's extrapolation limit after continuing with a larger base is T_extra = 2*pi*theta^(d_extra/d),
d_extra from pre-training. `extrapolation_limit` of a stage uses the first stage's d_extra (for
the first stage itself this is just its own training length, rounded up to a pair boundary).
Example, the seed paper's student (d = 64): stage 1 at 2,048 tokens, theta 10k gives d_extra = 42;
stage 2 at theta 500k then extrapolates to 2*pi*500000^(42/64) ~ 34.5k tokens by Liu's rule.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

GRID_POINTS_PER_DECADE = 100
GRID_MIN_EXP, GRID_MAX_EXP = 2.0, 12.0
_FIRST_CHUNK, _CHUNK = 256, 8192  # distances per step: most invalid bases fail in the first


def pair_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta_i = theta^(-2i/d), i = 0 .. d/2-1, float64."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head dim must be a positive even number, got {head_dim}")
    return theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)


def men_decay(head_dim: int, theta: float, distances: np.ndarray) -> np.ndarray:
    """B(m; theta) = sum_i cos(m * theta_i) for each distance m."""
    freqs = pair_frequencies(head_dim, theta)
    return np.cos(np.outer(np.asarray(distances, dtype=np.float64), freqs)).sum(axis=1)


def satisfies_men_bound(head_dim: int, theta: float, context: int) -> bool:
    """True when B(m; theta) >= 0 for every integer m in [0, context].

    Distances are checked from the far end down: bases below the bound first fail near m = L,
    so an invalid base is usually rejected after one chunk."""
    stop, chunk = context + 1, _FIRST_CHUNK
    while stop > 0:
        m = np.arange(max(0, stop - chunk), stop, dtype=np.float64)
        if men_decay(head_dim, theta, m).min() < 0:
            return False
        stop, chunk = stop - chunk, _CHUNK
    return True


def theta_grid() -> np.ndarray:
    k = np.arange(GRID_MIN_EXP * GRID_POINTS_PER_DECADE, GRID_MAX_EXP * GRID_POINTS_PER_DECADE + 1)
    return 10.0 ** (k / GRID_POINTS_PER_DECADE)


@functools.lru_cache(maxsize=256)
def theta_lower_bound(head_dim: int, context: int, robust: bool = False,
                      ) -> tuple[float, float | None]:
    """(first valid grid base, first grid base from which every grid base up to 10x the first is
    valid; None unless `robust`, which costs a full scan of ~100 more bases)."""
    grid = theta_grid()
    first_index = next((j for j, b in enumerate(grid) if satisfies_men_bound(head_dim, b, context)),
                       None)
    if first_index is None:
        raise ValueError(f"no base up to {grid[-1]:.3g} satisfies the bound for context {context}")
    first = float(grid[first_index])
    if not robust:
        return first, None
    valid_from = first
    for b in grid[first_index + 1:]:
        if b > 10 * first:
            break
        if not satisfies_men_bound(head_dim, b, context):
            valid_from = None
        elif valid_from is None:
            valid_from = float(b)
    return first, float(valid_from if valid_from is not None else 10 * first)


def critical_dimension(head_dim: int, theta: float, train_len: int) -> int:
    """Liu et al.'s d_extra = 2*ceil((d/2) * log_theta(T_train / 2pi)), clipped to [0, d]."""
    raw = 2 * math.ceil((head_dim / 2) * math.log(train_len / (2 * math.pi)) / math.log(theta))
    return max(0, min(head_dim, raw))


@dataclass
class StagePlan:
    context: int
    theta: float | None
    theta_lower_bound: float
    theta_valid_from: float | None
    below_bound: bool | None  # None when no theta was given
    critical_dimension: int | None
    extrapolation_limit: float | None  # 2*pi*theta^(d_extra/d)
    wavelengths: list[dict] = field(default_factory=list)


def plan_stage(head_dim: int, context: int, theta: float | None, robust: bool = False,
               reference_dimension: int | None = None) -> StagePlan:
    """`reference_dimension`: the critical dimension of the first (pre-training) stage, from which
    Liu et al. predict this stage's extrapolation limit 2*pi*theta^(d_extra/d)."""
    lower, valid_from = theta_lower_bound(head_dim, context, robust)
    plan = StagePlan(context=context, theta=theta, theta_lower_bound=lower,
                     theta_valid_from=valid_from, below_bound=None, critical_dimension=None,
                     extrapolation_limit=None)
    if theta is not None:
        plan.below_bound = theta < lower
        d_extra = critical_dimension(head_dim, theta, context)
        plan.critical_dimension = d_extra
        reference = d_extra if reference_dimension is None else reference_dimension
        plan.extrapolation_limit = 2 * math.pi * theta ** (reference / head_dim)
        plan.wavelengths = wavelength_table(head_dim, theta, context)
    return plan


def wavelength_table(head_dim: int, theta: float, context: int) -> list[dict]:
    """Per pair: frequency, wavelength (tokens per full turn), turns within `context`."""
    rows = []
    for i, f in enumerate(pair_frequencies(head_dim, theta)):
        wavelength = 2 * math.pi / f
        rows.append({"pair": i, "dims": [i, i + head_dim // 2], "frequency": float(f),
                     "wavelength": float(wavelength), "turns_in_context": context / wavelength,
                     "full_period_seen": bool(wavelength <= context)})
    return rows


def parse_stages(text: str) -> list[tuple[int, float]]:
    """'2048:10000,131072:500000' -> [(2048, 10000.0), (131072, 500000.0)]."""
    stages = []
    for part in text.split(","):
        try:
            length, theta = part.split(":")
            stages.append((int(length), float(theta)))
        except ValueError:
            raise ValueError(f"bad stage {part!r}: expected CONTEXT:THETA, e.g. 2048:10000") from None
    return stages


def plan(head_dim: int, stages: list[tuple[int, float | None]], context: int | None = None,
         robust: bool = False) -> dict:
    """The JSON document `kdcache rope-plan` prints: one entry per stage, and `theta_lower_bound`
    for the requested context (the last stage's when --context is not given)."""
    plans: list[StagePlan] = []
    for length, theta in stages:
        reference = plans[0].critical_dimension if plans else None
        plans.append(plan_stage(head_dim, length, theta, robust, reference))
    target = context if context is not None else stages[-1][0]
    lower = next((p.theta_lower_bound for p in plans if p.context == target), None)
    if lower is None:
        lower = theta_lower_bound(head_dim, target)[0]
    return {
        "head_dim": head_dim,
        "context": target,
        "theta_lower_bound": lower,
        "criterion": "Men et al. 2024: sum_i cos(m*theta^(-2i/d)) >= 0 for all integer m in "
                     "[0, context]; lowest = first valid base on the grid 10^(k/100), ascending",
        "stages": [asdict(p) for p in plans],
        "flagged": [p.context for p in plans if p.below_bound],
    }
