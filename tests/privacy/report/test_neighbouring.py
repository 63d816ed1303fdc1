"""The replace-one epsilon of the report against computations that share no code with it.

privacy.report.neighbouring asks dp_accounting's PLD accountant (REPLACE_ONE). Here the
same quantity comes from closed forms and scipy:

- q = 1: T steps of the Gaussian mechanism where one swapped record moves the sum by 2C
  are one Gaussian mechanism with mu = 2 sqrt(T) / sigma, whose exact privacy profile is
  delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) (Balle & Wang, "Improving
  the Gaussian Mechanism for Differential Privacy", ICML 2018, Theorem 8);
- q < 1, one step: the hockey-stick divergence of the replace-one pair
  P = (1-q) N(0, s^2) + q N(-1, s^2), Q = (1-q) N(0, s^2) + q N(1, s^2)
  (the pair privacy.report.neighbouring documents), delta(eps) = P(L > eps) - e^eps Q(L > eps)
  with L = ln P/Q decreasing in x, so {L > eps} = {x < x*}: closed-form normal CDFs at a
  root x* found by brentq;
- group privacy (Vadhan 2017, Lemma 2.2, k = 2): (eps, delta) under add/remove implies
  (2 eps, 2 e^eps delta) under replace-one, so the PLD number may never exceed that.

Each epsilon is the root in eps of delta(eps) = target, found by brentq.
"""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.report.neighbouring import epsilon_replace_one


def _eps_from_profile(delta_of_eps, delta: float) -> float:
    return optimize.brentq(lambda e: delta_of_eps(e) - delta, 0.0, 200.0, xtol=1e-10)


def exact_gaussian_replace_one(sigma: float, steps: int, delta: float) -> float:
    mu = 2 * math.sqrt(steps) / sigma
    norm = stats.norm
    return _eps_from_profile(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu), delta)


def one_step_subsampled_replace_one(sigma: float, q: float, delta: float) -> float:
    norm = stats.norm

    def log_ratio(x):  # ln P(x)/Q(x) in log space; the common normalising constant cancels
        common = math.log(1 - q) - x * x / (2 * sigma**2)
        p = np.logaddexp(common, math.log(q) - (x + 1) ** 2 / (2 * sigma**2))
        r = np.logaddexp(common, math.log(q) - (x - 1) ** 2 / (2 * sigma**2))
        return float(p - r)

    def cdf_p(x):
        return (1 - q) * norm.cdf(x / sigma) + q * norm.cdf((x + 1) / sigma)

    def cdf_q(x):
        return (1 - q) * norm.cdf(x / sigma) + q * norm.cdf((x - 1) / sigma)

    def delta_of_eps(e):
        if e >= log_ratio(-40 * sigma - 2):  # L decreases in x; beyond the bracket the mass is < 1e-300
            return 0.0
        x = optimize.brentq(lambda t: log_ratio(t) - e, -40 * sigma - 2, 40 * sigma + 2, xtol=1e-13)
        return cdf_p(x) - math.exp(e) * cdf_q(x)

    return _eps_from_profile(delta_of_eps, delta)


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (0.8, 3, 1e-6), (4.0, 50, 1e-5)])
def test_q_one_matches_the_exact_gaussian_mechanism_with_sensitivity_two(sigma, steps, delta):
    ours = epsilon_replace_one([SgmEvent(sigma, 1.0, steps)], delta=delta)
    exact = exact_gaussian_replace_one(sigma, steps, delta)
    assert exact - 1e-6 <= ours <= exact + 2e-3, (ours, exact)  # pessimistic PLD: not below the exact value


@pytest.mark.parametrize("sigma, q, delta", [(1.0, 0.1, 1e-5), (0.6, 0.05, 1e-5), (2.0, 0.3, 1e-6), (0.8, 0.01, 1e-5)])
def test_one_subsampled_step_matches_the_hockey_stick_integral(sigma, q, delta):
    ours = epsilon_replace_one([SgmEvent(sigma, q, 1)], delta=delta)
    exact = one_step_subsampled_replace_one(sigma, q, delta)
    assert exact - 1e-6 <= ours <= exact + 2e-3, (ours, exact)


@pytest.mark.parametrize("events", [
    [SgmEvent(0.5, 0.0356, 5)] * 3,  # the hospital demo: 3 rounds of 5 steps
    [SgmEvent(1.0, 0.1, 2), SgmEvent(1.3, 0.1, 2)],
    [SgmEvent(1.0, 0.01, 1000)],
])
def test_between_add_remove_and_its_group_privacy_bound(events):
    delta = 1e-5
    add_remove = epsilon(events, delta=delta)
    assert epsilon_replace_one(events, delta=delta) > add_remove * 0.99
    group_delta = 2 * math.exp(add_remove) * delta
    assert epsilon_replace_one(events, delta=group_delta) <= 2 * add_remove


def test_contract_no_events_and_no_noise():
    assert epsilon_replace_one([], delta=1e-5) == 0.0
    assert epsilon_replace_one([SgmEvent(0.0, 0.1, 1)], delta=1e-5) == math.inf


# ---- group privacy: what a record-level epsilon means for a person with g records ----------------------

def exact_gaussian_add_remove(mu: float, delta: float) -> float:
    """The Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang 2018, Theorem 8)."""
    norm = stats.norm
    return _eps_from_profile(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu), delta)


@pytest.mark.parametrize("group,sigma,steps", [(2, 4.0, 3), (5, 20.0, 10)])
def test_group_epsilon_without_sampling_is_the_gaussian_with_g_times_the_sensitivity(group, sigma, steps):
    """q = 1: all g records are in every batch, so T steps move the sum by g C each: mu = g sqrt(T) / sigma."""
    from privacy.report.neighbouring import epsilon_group

    got = epsilon_group([SgmEvent(sigma, 1.0, steps)], delta=1e-5, group=group)
    exact = exact_gaussian_add_remove(group * math.sqrt(steps) / sigma, 1e-5)
    assert exact <= got <= exact + 0.02  # PLD's pessimistic discretisation: an upper bound, close


def test_group_of_one_is_the_record_level_epsilon_and_grows_with_the_group():
    from privacy.report.neighbouring import epsilon_group

    events = [SgmEvent(1.0, 0.05, 120)]
    one = epsilon_group(events, delta=1e-5, group=1)
    assert one == pytest.approx(epsilon(events, delta=1e-5), abs=0.03)  # PRV vs PLD, both upper bounds
    by_group = [epsilon_group(events, delta=1e-5, group=g) for g in (1, 2, 4)]
    assert by_group == sorted(by_group) and by_group[2] > 2 * by_group[0]
    # never looser than plain group privacy's (g eps, g e^((g-1) eps) delta): here compared in eps at delta
    assert by_group[1] <= 2 * epsilon(events, delta=1e-5 / (2 * math.exp(one)))
