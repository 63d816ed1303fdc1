"""Noise calibration against what is left of a budget.

Opacus' ``get_noise_multiplier`` assumes a fresh accountant. A client that has already
spent part of its budget must instead find the smallest sigma such that its past events
plus every planned remaining participation stay within the budget:

    eps(past + rounds_left x SGM(sigma, q, steps_per_round), delta) <= budget.

eps is decreasing in sigma, so a bisection on sigma works; like Opacus we return the
upper (conservative) end of the final interval, so the result never overshoots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.accountant import SgmEvent, epsilon

SIGMA_MAX = 64.0
PRECISION = 0.01


def planned_epsilon(past: Sequence[SgmEvent], sigma: float, *, sample_rate: float, steps_per_round: int,
                    rounds_left: int, delta: float, accountant: str = "prv") -> float:
    """Epsilon after the past plus ``rounds_left`` rounds at ``sigma``."""
    future = SgmEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_per_round * rounds_left)
    return epsilon([*past, future], delta=delta, accountant=accountant)


def noise_for_budget(past: Sequence[SgmEvent], *, budget: float, sample_rate: float, steps_per_round: int,
                     rounds_left: int, delta: float, accountant: str = "prv",
                     sigma_max: float = SIGMA_MAX) -> float | None:
    """Smallest sigma (to within PRECISION, rounded up) that fits the plan in ``budget``.

    Returns None when even ``sigma_max`` does not fit, i.e. the budget is exhausted.
    """
    if rounds_left < 1:
        raise ValueError("rounds_left must be at least 1")

    def fits(sigma: float) -> bool:
        return planned_epsilon(past, sigma, sample_rate=sample_rate, steps_per_round=steps_per_round,
                               rounds_left=rounds_left, delta=delta, accountant=accountant) <= budget

    if not math.isfinite(budget) or not fits(sigma_max):
        return None
    low, high = 0.0, min(1.0, sigma_max)
    while not fits(high):
        low, high = high, min(2 * high, sigma_max)
    while high - low > PRECISION:
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high
