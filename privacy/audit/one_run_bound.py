"""An epsilon lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

Setting (their Section 3). m canaries; each is put into the training data independently
with probability 1/2 (S_i = +1: in, -1: out). After training, an auditor who sees only
what training released (here: the trained adapter; the initial adapter does not depend
on S) scores every canary and guesses T_i in {+1 "in", -1 "out", 0 "abstain"}. With r
guesses of which W are correct, their main result says: if training is (eps, delta)-DP
with respect to adding or removing one canary, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

(delta = 0 leaves the pure-DP tail f(v): an eps-DP algorithm guesses no better than
randomized response.) ``p_value`` is exactly this right-hand side, computed as in the
code the authors published with the paper (``p_value_DP_audit``); the bound at
confidence 1 - beta is the largest eps whose p-value is still <= beta, i.e. the largest
eps the observed guesses reject. It is a lower bound on the true epsilon with
probability >= 1 - beta, never an estimate of it: a weak attack gives a small bound for
a leaky model. A bound above the epsilon the accountant reports means a bug (in the
mechanism, the sampling or the accounting).

Choosing how many guesses to make after seeing the scores is a multiple comparison:
``audit`` tries a FIXED grid of (k+, k-) (guess "in" for the k+ highest scores, "out"
for the k- lowest), tests each at beta / |grid| and reports the largest bound; by the
union bound all of them hold together with probability >= 1 - beta. (The paper's
experiments report the best k without such a correction.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

GRID_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
EPSILON_CAP = 1000.0  # no finite-sample audit gets near this; the search stops there


def _log_binomial_pmf(r: int, p: float) -> list[float]:
    """log P[Binomial(r, p) = k] for k = 0..r (exact terms, summed later in the log domain)."""
    if p <= 0.0 or p >= 1.0:
        certain = 0 if p <= 0.0 else r
        return [0.0 if k == certain else -math.inf for k in range(r + 1)]
    log_p, log_q = math.log(p), math.log1p(-p)
    log_r = math.lgamma(r + 1)
    return [log_r - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * log_p + (r - k) * log_q for k in range(r + 1)]


def _log_sum(terms: Sequence[float]) -> float:
    top = max(terms, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (epsilon, delta)-DP algorithm (the bound above).

    :param m: canaries, each included independently with probability 1/2
    :param r: guesses made (the others abstained)
    :param v: correct guesses
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    log_pmf = _log_binomial_pmf(r, 1.0 / (1.0 + math.exp(-epsilon)))  # accuracy of eps-DP randomized response
    tail = math.exp(_log_sum(log_pmf[v:]))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # alpha = max_i P[v - i <= W' < v] / i, W' ~ Binomial(r, e^eps / (1 + e^eps)); i > v adds nothing.
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += math.exp(log_pmf[v - i])
        alpha = max(alpha, below / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


@lru_cache(maxsize=4096)
def epsilon_lower_bound(*, m: int, r: int, v: int, beta: float, delta: float) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses reject at level ``beta`` (0 if none).

    Bisection on p_value(eps) <= beta, returning the end of the final interval that is
    rejected (to within 1e-6), so the result never overstates what the guesses show.
    With delta = 0 the p-value is increasing in eps and this is the exact supremum; the
    delta term need not be monotone, and then the result is still a rejected epsilon
    (a valid, possibly slightly smaller, lower bound).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def rejected(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
        if high > EPSILON_CAP:
            return EPSILON_CAP
    while high - low > 1e-6:
        mid = (low + high) / 2
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Guess:
    """One way of guessing: "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest."""

    k_plus: int
    k_minus: int
    guesses: int = 0  # r
    correct: int = 0  # v
    epsilon_lower: float = 0.0  # at the per-test level beta / |grid|


def default_grid(m: int) -> list[tuple[int, int]]:
    """(k, k) and (k, 0) for k = m/16, m/8, m/4, m/2: fixed before any score is seen.

    Guessing both ways uses the most canaries; guessing only "in" for the top scores
    suits attacks that are sure about memorized canaries and unsure about the rest.
    """
    ks = sorted({max(1, round(m * f)) for f in GRID_FRACTIONS})
    grid = [(k, k) for k in ks if 2 * k <= m] + [(k, 0) for k in ks]
    return list(dict.fromkeys(grid))


def audit(scores: Sequence[float], included: Sequence[bool], *, beta: float = 0.05, delta: float = 0.0,
          grid: Sequence[tuple[int, int]] | None = None) -> dict:
    """The one-run lower bound from membership scores (higher = more likely a member).

    Ties in the scores are broken by canary index, which does not depend on who was
    included. Returns ``epsilon_lower`` (the largest over the grid, each at beta/|grid|),
    the guessing that gave it, every guessing tried, and ``max_provable``: the bound if
    every guess were right. No audit of this size can show more, so a claim at or above
    it cannot be refuted by it (the bound grows only like log m: m = 128 proves at most ~3).
    """
    m = len(scores)
    if m != len(included) or m == 0:
        raise ValueError(f"{m} scores for {len(included)} canaries")
    if any(not math.isfinite(s) for s in scores):
        raise ValueError("membership scores must be finite")
    grid = list(grid) if grid is not None else default_grid(m)
    if not grid or any(kp < 0 or km < 0 or kp + km > m or kp + km == 0 for kp, km in grid):
        raise ValueError(f"invalid guessing grid for {m} canaries: {grid}")
    level = beta / len(grid)
    order = sorted(range(m), key=lambda i: (-scores[i], i))  # most likely member first
    tried = []
    for k_plus, k_minus in grid:
        correct = sum(bool(included[i]) for i in order[:k_plus])
        correct += sum(not included[i] for i in order[m - k_minus:]) if k_minus else 0
        r = k_plus + k_minus
        tried.append(Guess(k_plus, k_minus, r, correct,
                           epsilon_lower_bound(m=m, r=r, v=correct, beta=level, delta=delta)))
    best = max(tried, key=lambda g: (g.epsilon_lower, g.correct / g.guesses))
    perfect = max(epsilon_lower_bound(m=m, r=g.guesses, v=g.guesses, beta=level, delta=delta) for g in tried)
    return {"epsilon_lower": best.epsilon_lower, "beta": beta, "delta": delta, "canaries": m,
            "tests": len(grid), "beta_per_test": level, "max_provable": perfect, "best": asdict(best),
            "grid": [asdict(g) for g in tried]}
