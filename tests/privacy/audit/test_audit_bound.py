"""The one-run epsilon lower bound: checked against scipy, closed forms, properties, and by simulation.

Every number the audit reports rests on ``p_value``; it is computed here in exact terms
(log-domain binomial sums) and checked against scipy.stats.binom, an independent
implementation, and against the closed form of the all-correct case.
"""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privacy.audit.one_run_bound import audit, default_grid, epsilon_lower_bound, p_value


def scipy_p_value(m, r, v, eps, delta):
    """The paper's formula written with scipy's binomial (as in the authors' code)."""
    q = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    alpha = np.max((stats.binom.sf(v - i - 1, r, q) - tail) / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (100, 50, 40, 1.0, 0.0), (100, 50, 40, 1.0, 1e-5), (1000, 200, 150, 0.5, 1e-3), (64, 64, 64, 2.0, 0.0),
    (128, 128, 100, 0.0, 1e-5), (500, 300, 299, 4.0, 1e-6), (32, 10, 3, 0.2, 0.01), (1000, 1000, 900, 3.0, 1e-5),
])
def test_p_value_matches_scipy(m, r, v, eps, delta):
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(scipy_p_value(m, r, v, eps, delta),
                                                                             rel=1e-9, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(r=st.integers(1, 300), data=st.data(), eps=st.floats(0, 6), delta=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]))
def test_p_value_matches_scipy_everywhere(r, data, eps, delta):
    v = data.draw(st.integers(0, r))
    m = data.draw(st.integers(r, 3 * r))
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(scipy_p_value(m, r, v, eps, delta),
                                                                             rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("r", [10, 20, 50, 100, 200, 1000])
@pytest.mark.parametrize("beta", [0.05, 0.01])
def test_all_guesses_right_gives_the_closed_form(r, beta):
    """v = r, delta = 0: p = q^r <= beta  <=>  eps <= logit(beta^(1/r))."""
    q = beta ** (1 / r)
    closed = math.log(q / (1 - q))
    assert epsilon_lower_bound(m=r, r=r, v=r, beta=beta, delta=0.0) == pytest.approx(closed, abs=2e-6)
    assert closed > 0


def test_returned_bound_is_rejected_and_a_bit_more_is_not():
    for m, r, v, delta in [(200, 100, 90, 0.0), (200, 100, 90, 1e-5), (1000, 500, 400, 1e-4)]:
        eps = epsilon_lower_bound(m=m, r=r, v=v, beta=0.05, delta=delta)
        assert eps > 0
        assert scipy_p_value(m, r, v, eps, delta) <= 0.05 < scipy_p_value(m, r, v, eps + 1e-4, delta)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_chance_level_guessing_proves_nothing(r):
    assert epsilon_lower_bound(m=r, r=r, v=r // 2, beta=0.05, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=r, r=r, v=0, beta=0.05, delta=0.0) == 0.0
    assert epsilon_lower_bound(m=r, r=0, v=0, beta=0.05, delta=0.0) == 0.0


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 400), data=st.data(), delta=st.sampled_from([0.0, 1e-5]))
def test_bound_is_monotone_in_correct_guesses_and_confidence(r, data, delta):
    v = data.draw(st.integers(0, r - 1))
    lower = epsilon_lower_bound(m=2 * r, r=r, v=v, beta=0.05, delta=delta)
    assert lower <= epsilon_lower_bound(m=2 * r, r=r, v=v + 1, beta=0.05, delta=delta) + 1e-6
    assert epsilon_lower_bound(m=2 * r, r=r, v=v, beta=0.01, delta=delta) <= lower + 1e-6


def test_delta_only_lowers_the_bound():
    for delta in (1e-6, 1e-4, 1e-3):
        assert (epsilon_lower_bound(m=1000, r=500, v=450, beta=0.05, delta=delta)
                <= epsilon_lower_bound(m=1000, r=500, v=450, beta=0.05, delta=0.0))
    assert epsilon_lower_bound(m=1000, r=500, v=450, beta=0.05, delta=1e-3) < \
        epsilon_lower_bound(m=1000, r=500, v=450, beta=0.05, delta=0.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        p_value(m=10, r=11, v=3, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError):
        p_value(m=10, r=5, v=6, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError):
        p_value(m=10, r=5, v=3, epsilon=-1.0, delta=0.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(m=10, r=5, v=3, beta=0.0, delta=0.0)
    with pytest.raises(ValueError):
        audit([0.0, float("nan")], [True, False])
    with pytest.raises(ValueError):
        audit([0.0, 1.0], [True, False], grid=[(2, 1)])


def test_grid_is_fixed_by_m_and_valid():
    assert default_grid(128) == [(8, 8), (16, 16), (32, 32), (64, 64), (8, 0), (16, 0), (32, 0), (64, 0)]
    for m in (2, 3, 7, 16, 1000):
        assert all(0 < kp + km <= m for kp, km in default_grid(m))


def test_audit_counts_guesses_and_applies_bonferroni():
    rng = random.Random(1)
    included = [rng.random() < 0.5 for _ in range(200)]
    perfect = audit([float(x) + rng.random() for x in included], included, beta=0.05, delta=0.0,
                    grid=[(10, 10), (20, 0)])
    assert perfect["tests"] == 2 and perfect["beta_per_test"] == 0.025
    for guess in perfect["grid"]:
        assert guess["correct"] == guess["guesses"]
        assert guess["epsilon_lower"] == epsilon_lower_bound(m=200, r=guess["guesses"], v=guess["correct"],
                                                             beta=0.025, delta=0.0)
    assert perfect["epsilon_lower"] == max(g["epsilon_lower"] for g in perfect["grid"])
    inverted = audit([-float(x) for x in included], included, grid=[(10, 10)])
    assert inverted["grid"][0]["correct"] == 0 and inverted["epsilon_lower"] == 0.0


def test_randomized_response_at_eps_is_caught_above_eps_at_most_beta_of_the_time():
    """The contract: for an eps-DP mechanism the bound exceeds eps with probability <= beta.

    The mechanism: each canary's score reveals its membership through eps-randomized
    response (right with probability e^eps / (1 + e^eps)), the best an eps-DP algorithm
    can do. Over 400 audits the bound exceeds eps in at most beta of them, and it is far
    from trivial (it gets within a factor 2 of eps on average).
    """
    eps, m, beta = 1.0, 400, 0.05
    rng = random.Random(7)
    right = 1 / (1 + math.exp(-eps))
    bounds = []
    for _ in range(400):
        included = [rng.random() < 0.5 for _ in range(m)]
        said = [inc if rng.random() < right else not inc for inc in included]
        scores = [float(s) + 1e-3 * rng.random() for s in said]  # ties broken at random
        bounds.append(audit(scores, included, beta=beta, delta=0.0, grid=[(m // 2, m // 2)])["epsilon_lower"])
    assert sum(b > eps for b in bounds) <= beta * len(bounds)
    assert sum(bounds) / len(bounds) > eps / 2


def test_max_provable_is_the_bound_of_all_guesses_right():
    rng = random.Random(3)
    included = [rng.random() < 0.5 for _ in range(64)]
    result = audit([rng.random() for _ in included], included, grid=[(8, 8), (16, 0)], delta=1e-5)
    assert result["max_provable"] == epsilon_lower_bound(m=64, r=16, v=16, beta=0.025, delta=1e-5)
    assert result["epsilon_lower"] <= result["max_provable"] < 3
