"""Noise calibration: never overshoots, is tight, and searches only where PRV is cheap and safe."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import privacy.mechanism.calibrate as calibrate
from privacy.mechanism.accountant import SgmEvent
from privacy.mechanism.calibrate import SIGMA_MIN, noise_for_budget, planned_epsilon


@settings(max_examples=12, deadline=None)
@given(budget=st.floats(0.5, 10.0), q=st.floats(0.01, 0.2), steps=st.integers(1, 20), rounds=st.integers(1, 5),
       spent_sigma=st.floats(1.0, 4.0), guess=st.one_of(st.none(), st.floats(0.1, 8.0)))
def test_calibration_never_overshoots_and_is_tight(budget, q, steps, rounds, spent_sigma, guess):
    past = [SgmEvent(spent_sigma, q, steps)]
    sigma = noise_for_budget(past, budget=budget, sample_rate=q, steps_per_round=steps, rounds_left=rounds,
                             delta=1e-5, guess=guess)
    plan = dict(sample_rate=q, steps_per_round=steps, rounds_left=rounds, delta=1e-5)
    if sigma is None:
        assert planned_epsilon(past, 64.0, **plan) > budget
        return
    assert sigma >= SIGMA_MIN
    assert planned_epsilon(past, sigma, **plan) <= budget
    if sigma > SIGMA_MIN:  # and it is tight: a little less noise would not fit
        assert planned_epsilon(past, sigma - 0.02, **plan) > budget


def test_calibration_matches_opacus_for_a_fresh_budget():
    """dp-notes: q=0.01, 1000 steps, delta=1e-5, eps=8 -> PRV sigma 0.587."""
    sigma = noise_for_budget([], budget=8.0, sample_rate=0.01, steps_per_round=1000, rounds_left=1, delta=1e-5)
    assert sigma == pytest.approx(0.587, abs=0.015)


def probes(monkeypatch) -> list[float]:
    """The sigmas the search asks the accountant about."""
    seen = []
    original = calibrate.planned_epsilon

    def recording(past, sigma, **kwargs):
        seen.append(sigma)
        return original(past, sigma, **kwargs)

    monkeypatch.setattr(calibrate, "planned_epsilon", recording)
    return seen


def test_a_generous_budget_gets_the_floor_and_nothing_below_it_is_evaluated(monkeypatch):
    """Plain bisection would probe sigma 0.06 here, where PRV's grid does not fit in memory."""
    seen = probes(monkeypatch)
    sigma = noise_for_budget([], budget=1000.0, sample_rate=0.018, steps_per_round=80, rounds_left=3, delta=1e-5)
    assert sigma == SIGMA_MIN
    assert min(seen) == SIGMA_MIN


def test_last_rounds_sigma_as_guess_finds_the_same_answer_in_fewer_evaluations(monkeypatch):
    plan = dict(budget=8.0, sample_rate=0.05, steps_per_round=10, delta=1e-5)
    first = noise_for_budget([], rounds_left=3, **plan)
    past = [SgmEvent(first, 0.05, 10)]
    seen = probes(monkeypatch)
    cold = noise_for_budget(past, rounds_left=2, **plan)
    cold_probes = len(seen)
    seen.clear()
    warm = noise_for_budget(past, rounds_left=2, guess=first, **plan)
    assert warm == pytest.approx(cold, abs=0.01)
    assert first - 0.02 <= warm <= first  # the mix with a past round at `first` can only need less
    assert len(seen) <= 6 < cold_probes


def test_a_hostile_plan_is_calibrated_without_prv(monkeypatch):
    """sigma 0.3-5 at q 0.5 over 10^5 steps: every probe is far over the budget; the RDP bound says so at once."""
    from opacus.accountants import PRVAccountant

    monkeypatch.setattr(PRVAccountant, "get_epsilon", lambda self, *a, **k: pytest.fail(f"PRV ran on {self.history}"))
    started = time.monotonic()
    assert noise_for_budget([], budget=8.0, sample_rate=0.5, steps_per_round=100, rounds_left=1000, delta=1e-5,
                            sigma_max=5.0, guess=0.3) is None
    assert time.monotonic() - started < 10  # a generous bound: ~0.3 s here
