"""Log-prob quantiser whose step is spent where the KL needs it.

Quantising log-prob `l` with error `e` multiplies that entry's probability by exp(e); to second
order KL(p || q) = 1/2 * Var_p(e). An error uniform in [-D/2, D/2] on an entry of probability p
costs p * D^2 / 24. Minimising the bits sum_i -log2 D_i under a KL budget gives p_i * D_i^2 =
const, i.e. D(l) proportional to exp(-l / 2): a uniform step in sqrt(p). Very unlikely entries
would then get enormous steps, so the step is capped at `step_max` in log space:

    D(l) = min(step_max, sqrt_step * exp(-l / 2))

The two pieces meet at l = T = 2 ln(sqrt_step / step_max). The level coordinate y(l) = integral
dl / D(l) is

    y(l) = 2 (exp(l/2) - exp(T/2)) / sqrt_step     for l >= T   (uniform in sqrt(p))
    y(l) = (l - T) / step_max                      for l <  T   (uniform in log p)

and a log-prob is stored as the integer code round(y(0) - y(l)), so code 0 is log-prob 0 and codes
grow as probability falls. Decoding reads a float32 table of code -> log-prob (the level itself,
the midpoint of its cell).

The codec (qrank) applies it to log-probs *relative to the row's top entry*, l_j - l_top, so
"p" above reads p_j / p_top. Budget, per token, over its k ids renormalised (mass M): an entry
above T adds about sqrt_step^2 * (p_top / M) / 24 whatever its probability (the error in log p_j
has variance sqrt_step^2 p_top / (12 p_j), weighted by p_j / M), and the capped entries at most
step_max^2 / 24 times their share of the mass. With the defaults (sqrt_step 0.025, step_max 1.0:
T = ln(6.25e-4), entries within a factor 1,600 of the top use the sqrt piece) a flat row costs
~sqrt_step^2 / 24 = 2.6e-5 nats, a confident row with a long flat tail at most
k * sqrt_step^2 / 24 (1.7e-3 at k = 64); real rows sit between, 5e-4 on average on a trained
model's top-64 (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

MAX_CODE = 65535  # codes are uint16; below about -13,000 nats the log-prob saturates


@dataclass(frozen=True)
class LogProbQuantizer:
    step_max: float = 1.0  # largest step, in nats, for improbable entries
    sqrt_step: float = 0.025  # step in 2 sqrt(p) coordinates, for likely entries

    def __post_init__(self) -> None:
        if not 0 < self.sqrt_step < self.step_max <= 4.0:
            raise ValueError("need 0 < sqrt_step < step_max <= 4 for the quantiser, got "
                             f"sqrt_step={self.sqrt_step}, step_max={self.step_max}")

    @property
    def threshold(self) -> float:
        """Log-prob T where the sqrt(p) piece meets the capped log piece."""
        return 2.0 * math.log(self.sqrt_step / self.step_max)

    def _y(self, logprobs: np.ndarray, half_exp: np.ndarray | None = None) -> np.ndarray:
        t = self.threshold
        lp = np.asarray(logprobs, dtype=np.float64)
        if half_exp is None:
            half_exp = np.exp(np.minimum(lp, 0.0) / 2.0)
        upper = 2.0 * (half_exp - math.exp(t / 2.0)) / self.sqrt_step
        return np.where(lp >= t, upper, (lp - t) / self.step_max)

    @cached_property
    def _y_top(self) -> float:
        return float(self._y(np.zeros(1))[0])

    def encode(self, logprobs: np.ndarray, half_exp: np.ndarray | None = None) -> np.ndarray:
        """Integer codes (int64, same shape): 0 for log-prob 0, larger for less likely entries.
        `half_exp` = exp(min(logprobs, 0) / 2) if already known (it is step-independent)."""
        codes = np.rint(self._y_top - self._y(logprobs, half_exp))
        return np.clip(codes, 0, MAX_CODE).astype(np.int64)

    def levels(self, n: int = MAX_CODE + 1) -> np.ndarray:
        """float32 [n]: the log-prob each code decodes to (the decoder's lookup table)."""
        t = self.threshold
        y = self._y_top - np.arange(n, dtype=np.float64)
        inner = np.maximum(y * self.sqrt_step / 2.0 + math.exp(t / 2.0), 1e-300)
        lp = np.where(y >= 0, 2.0 * np.log(inner), t + y * self.step_max)
        return np.minimum(lp, 0.0).astype(np.float32)
