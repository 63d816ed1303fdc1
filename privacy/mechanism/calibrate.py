"""Noise calibration against what is left of a budget.

Opacus' ``get_noise_multiplier`` assumes a fresh accountant. A client that has already
spent part of its budget must instead find the smallest sigma such that its past events
plus every planned remaining participation stay within the budget:

    eps(past + rounds_left x SGM(sigma, q, steps_per_round), delta) <= budget.

eps is decreasing in sigma, so a bracket-and-bisect search works; like Opacus we return
the upper (conservative) end of the final interval, so the result never overshoots.

Where the search looks matters as much as how many times. A PRV evaluation at small sigma
is slow and large: its grid spans the privacy loss, which explodes as sigma -> 0
(measured: sigma 0.05, q 0.018, 240 steps was killed at 24 GiB; sigma 0.3 still costs
0.6-3.8 s). Plain bisection from [0, 1] probes 0.5, 0.25, ... whenever the budget is
generous. So the search starts from a guess (the client's sigma of its last round: in a
run that keeps to its plan the answer is the same, found in 2-3 evaluations instead of
~10) and gallops away from it, and it never goes below ``SIGMA_MIN``: below 0.3 the
epsilons are far beyond any meaningful guarantee (sigma 0.3 already gives eps 52-125 at
q 0.01-0.125 over 100-1000 steps), so a budget that allows less noise gets 0.3, the
private side of what it asked.

What one evaluation may cost is bounded in the accountant (privacy.mechanism.accountant):
each probe passes the budget, so a plan whose RDP epsilon is far beyond it (a coordinator's
sigma 0.3 at q 0.5 over 10^5 steps) is answered "does not fit" from the RDP bound alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.mechanism.accountant import SgmEvent, epsilon

SIGMA_MAX = 64.0
SIGMA_MIN = 0.3
PRECISION = 0.01


def planned_epsilon(past: Sequence[SgmEvent], sigma: float, *, sample_rate: float, steps_per_round: int,
                    rounds_left: int, delta: float, accountant: str = "prv", budget: float | None = None) -> float:
    """Epsilon after the past plus ``rounds_left`` rounds at ``sigma``.

    ``budget``: the answer is only compared with it, so a plan far beyond it is answered by
    the cheap RDP bound, not PRV (privacy.mechanism.accountant.epsilon).
    """
    future = SgmEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_per_round * rounds_left)
    return epsilon([*past, future], delta=delta, accountant=accountant, budget=budget)


def noise_for_budget(past: Sequence[SgmEvent], *, budget: float, sample_rate: float, steps_per_round: int,
                     rounds_left: int, delta: float, accountant: str = "prv", sigma_max: float = SIGMA_MAX,
                     guess: float | None = None) -> float | None:
    """Smallest sigma >= SIGMA_MIN (to within PRECISION, rounded up) that fits the plan in ``budget``.

    ``guess`` (e.g. last round's sigma) only changes the cost of the search, not its answer.
    Returns None when even ``sigma_max`` does not fit, i.e. the budget is exhausted.
    """
    if rounds_left < 1:
        raise ValueError("rounds_left must be at least 1")
    floor = min(SIGMA_MIN, sigma_max)

    def fits(sigma: float) -> bool:
        return planned_epsilon(past, sigma, sample_rate=sample_rate, steps_per_round=steps_per_round,
                               rounds_left=rounds_left, delta=delta, accountant=accountant, budget=budget) <= budget

    if not math.isfinite(budget) or not fits(sigma_max):
        return None
    start = min(max(guess or 1.0, floor), sigma_max)
    step = PRECISION if guess else start / 4  # a guess is usually right: look next to it first
    if fits(start):
        high = start
        while True:  # gallop down to a sigma that does not fit, or to the floor
            if high <= floor:
                return floor
            low = max(high - step, high / 1.5, floor)  # never far below: small sigmas are the dear ones
            if not fits(low):
                break
            high, step = low, 2 * step
    else:
        low = start
        while True:  # gallop up; sigma_max fits, so this ends
            high = min(low + step, sigma_max)
            if fits(high):
                break
            low, step = high, 2 * step
    while high - low > PRECISION:
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high
