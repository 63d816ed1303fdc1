"""The reported accountant against an independent one (Google's dp_accounting PLD)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.mechanism.accountant import SgmEvent, epsilon


def pld_epsilon(events, delta, interval=1e-4):
    """dp_accounting's PLD accountant (add/remove), each event composed on its own, in order."""
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant(value_discretization_interval=interval)
    for e in events:
        accountant.compose(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
                           e.steps)
    return accountant.get_epsilon(delta)


GRID = [  # (sigma, q, steps, delta), spanning the regimes clients run in
    (1.0, 0.01, 1000, 1e-5),
    (0.6, 0.01, 3000, 1e-5),
    (0.8, 1024 / 67349, 197, 1.48e-5),
    (0.5, 0.0356, 15, 1e-5),
    (1.0, 0.02, 500, 1e-6),
    (2.0, 0.1, 100, 1e-5),
    (0.7, 0.05, 60, 1e-4),
    (1.5, 0.004, 5000, 1e-7),
]


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_prv_within_tolerance_of_pld(sigma, q, steps, delta):
    """Never more than 0.5% below the PLD value (under-reporting), at most 2% above."""
    event = SgmEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    ours, reference = epsilon([event], delta=delta), pld_epsilon([event], delta)
    assert reference * 0.995 <= ours <= reference * 1.02, (ours, reference)


@pytest.mark.parametrize("sigma, q, steps, delta", GRID[:4])
def test_rdp_cross_check_is_an_upper_bound(sigma, q, steps, delta):
    event = SgmEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert epsilon([event], delta=delta, accountant="rdp") >= pld_epsilon([event], delta) * 0.995


def test_reference_numbers_from_dp_notes():
    assert epsilon([SgmEvent(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(1.838, abs=0.01)
    assert epsilon([SgmEvent(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp") == pytest.approx(2.101, rel=0.01)
    federated = [SgmEvent(1.0, 0.02, 50)] * 10  # 10 rounds of 50 local steps
    assert epsilon(federated, delta=1e-5) == pytest.approx(2.77, rel=0.02)


def test_contract_no_events_and_no_noise():
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([SgmEvent(0.0, 0.1, 1)], delta=1e-5) == math.inf
    with pytest.raises(ValueError):
        SgmEvent(-1.0, 0.1, 1)


def test_heterogeneous_history_matches_pld():
    events = [SgmEvent(0.8, 0.04, 20), SgmEvent(1.3, 0.02, 50), SgmEvent(0.8, 0.04, 20)]
    ours, reference = epsilon(events, delta=1e-5), pld_epsilon(events, 1e-5)
    assert reference * 0.995 <= ours <= reference * 1.02


@settings(max_examples=15, deadline=None)
@given(rounds=st.lists(st.tuples(st.sampled_from([0.6, 0.9, 1.5, 3.0]), st.sampled_from([0.01, 0.05, 0.2]),
                                 st.integers(1, 40)), min_size=2, max_size=6))
def test_round_by_round_matches_pld_composed_round_by_round_and_grows(rounds):
    """A client's history, one event per round (sigma, q or steps may change between rounds), against
    dp_accounting's PLD composing the same rounds one by one: an independent implementation
    (Doroshenko et al., PETS 2022), so a composition bug here cannot hide behind itself."""
    per_round = [SgmEvent(sigma, q, steps) for sigma, q, steps in rounds]
    ours, reference = epsilon(per_round, delta=1e-5), pld_epsilon(per_round, 1e-5, interval=1e-3)
    assert reference * 0.995 - 1e-3 <= ours <= reference * 1.02 + 0.02, (ours, reference)
    curve = [epsilon(per_round[:k], delta=1e-5) for k in range(1, len(rounds) + 1)]
    assert all(a < b for a, b in zip(curve, curve[1:]))
