"""Confidence intervals over seeds and samples: a two-level (hierarchical) bootstrap.

A score set is a list per seed of per-sample scores (0/1 for passkey). One bootstrap replicate
draws seeds with replacement, then samples with replacement within each drawn seed, and takes the
mean of everything drawn; the 2.5% and 97.5% quantiles of the replicates bound the 95% interval.
With one seed it is the plain sample bootstrap. Differences between two arms resample each arm
independently. Seeded, so a report is reproducible.
"""

from __future__ import annotations

import numpy as np

REPLICATES = 2000


def _replicates(groups: list[list[float]], rng: np.random.Generator, n: int) -> np.ndarray:
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        return np.full(n, np.nan)
    out = np.empty(n)
    for r in range(n):
        picked = rng.integers(0, len(arrays), size=len(arrays))
        draws = [arrays[i][rng.integers(0, len(arrays[i]), size=len(arrays[i]))] for i in picked]
        out[r] = np.concatenate(draws).mean()
    return out


def mean_ci(groups: list[list[float]], seed: int = 0) -> dict:
    """Mean and 95% interval of per-seed score lists."""
    flat = [x for g in groups for x in g]
    if not flat:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    reps = _replicates(groups, np.random.default_rng(seed), REPLICATES)
    return {"mean": float(np.mean(flat)), "lo": float(np.quantile(reps, 0.025)),
            "hi": float(np.quantile(reps, 0.975)), "n": len(flat), "seeds": len(groups)}


def diff_ci(a: list[list[float]], b: list[list[float]], seed: int = 0) -> dict:
    """Mean of a minus mean of b, with its 95% interval; `sign` says whether it excludes 0."""
    fa, fb = [x for g in a for x in g], [x for g in b for x in g]
    if not fa or not fb:
        return {"diff": None, "lo": None, "hi": None, "sign": "no data"}
    rng = np.random.default_rng(seed)
    reps = _replicates(a, rng, REPLICATES) - _replicates(b, rng, REPLICATES)
    lo, hi = float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))
    sign = "positive" if lo > 0 else "negative" if hi < 0 else "interval includes 0"
    return {"diff": float(np.mean(fa) - np.mean(fb)), "lo": lo, "hi": hi, "sign": sign}
