"""The reported accountant against an independent one (Google's dp_accounting PLD)."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import privacy.mechanism.accountant as accountant
from privacy.mechanism.accountant import PRV_EPS_ERROR, PRV_MAX_EPS_ERROR, SgmEvent, epsilon, prv_eps_error


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


HISTORIES = [  # merged histories as the ledger composes them: one round, several rounds, a DP evaluation's q = 1
    [(1.0, 0.01, 1000)],
    [(0.609375, 0.125, 3), (0.604375, 0.125, 3)],
    [(0.9 + 0.01 * i, 0.02, 50) for i in range(6)],
    [(1.2, 0.05, 40), (7.07, 1.0, 1)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_the_cached_curves_answer_exactly_as_opacus_own_accountants(history):
    """The RDP curves are cached and PRV's grid is sized from them: the answers must not move by one bit."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    events = [SgmEvent(*event) for event in history]
    for _ in range(2):  # cold, then from the cache
        prv, rdp = PRVAccountant(), RDPAccountant()
        prv.history, rdp.history = list(history), list(history)
        assert epsilon(events, delta=1e-5) == prv.get_epsilon(delta=1e-5)
        orders = accountant.RDP_ORDERS
        assert epsilon(events, delta=1e-5, accountant="rdp") == rdp.get_epsilon(delta=1e-5, alphas=orders)


def test_a_cached_curve_cannot_be_changed_in_place():
    curve = accountant._curve(1.0, 0.01, tuple(accountant.RDP_ORDERS))
    with pytest.raises(ValueError):
        curve[0] = 0.0


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


# ---- what one evaluation may cost: a coordinator chooses sigma, q and the steps it plans ----------------------
@pytest.fixture
def no_prv(monkeypatch):
    """PRV must not run: the histories below would make its grid take minutes and GiBs."""
    from opacus.accountants import PRVAccountant

    def refusing(self, *args, **kwargs):
        raise AssertionError(f"PRV ran on {self.history}")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", refusing)


@pytest.mark.parametrize("sigma, q, steps", [
    (0.3, 0.5, 10**5),  # epsilon ~3e5: PRV's grid would be 6e10 points (measured at 1000 steps: >4.5 GB)
    (1.0, 0.01, 10**6),  # 1000 rounds x 1000 steps: epsilon ~150, but a grid of 1.1e8 points (~17 GB)
])
def test_a_history_prv_cannot_afford_is_answered_by_rdp_an_upper_bound(no_prv, sigma, q, steps):
    events = [SgmEvent(sigma, q, steps)]
    started = time.monotonic()
    assert epsilon(events, delta=1e-5) == epsilon(events, delta=1e-5, accountant="rdp")
    assert time.monotonic() - started < 10  # a generous bound: ~0.3 s here


def test_far_beyond_the_budget_prv_is_not_asked(no_prv):
    """RDP 403 against a budget of 8: it does not fit whatever PRV would say (380)."""
    events = [SgmEvent(0.3, 0.5, 100)]
    assert epsilon(events, delta=1e-5, budget=8.0) == epsilon(events, delta=1e-5, accountant="rdp") > 8.0


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.001, 1), (0.5, 0.001, 1), (0.3, 0.001, 1), (2.0, 0.001, 10),
                                             (1.0, 0.01, 10), (0.3, 0.5, 10), (0.6, 0.01, 3000)])
def test_the_budget_shortcut_never_refuses_what_prv_admits(sigma, q, steps):
    """At a budget equal to PRV's answer PRV is still asked, where RDP is furthest from it (up to 32x)."""
    events = [SgmEvent(sigma, q, steps)]
    prv = epsilon(events, delta=1e-5)
    assert epsilon(events, delta=1e-5, budget=prv) == prv


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_normal_histories_get_prv_at_its_usual_error(sigma, q, steps, delta):
    assert prv_eps_error([(sigma, q, steps)], delta) == PRV_EPS_ERROR


def test_the_grid_bound_is_the_grid_opacus_builds(monkeypatch):
    """The bound is computed without running PRV: it must be the size PRV then allocates."""
    import opacus.accountants.prv as opacus_prv

    sizes, discretize = [], opacus_prv.discretize
    monkeypatch.setattr(opacus_prv, "discretize", lambda tprv, domain: sizes.append(domain.size) or
                        discretize(tprv, domain))
    history = [(1.0, 0.02, 50), (1.3, 0.02, 50)]
    epsilon([SgmEvent(*event) for event in history], delta=1e-5)
    size = sizes[0]
    monkeypatch.setattr(accountant, "PRV_MAX_GRID", size)
    assert prv_eps_error(history, 1e-5) == PRV_EPS_ERROR
    monkeypatch.setattr(accountant, "PRV_MAX_GRID", size - 1)
    assert prv_eps_error(history, 1e-5) > PRV_EPS_ERROR
    monkeypatch.setattr(accountant, "PRV_MAX_GRID", 10**9)
    monkeypatch.setattr(accountant, "PRV_MAX_CELLS", 2 * size)
    assert prv_eps_error(history, 1e-5) == PRV_EPS_ERROR
    monkeypatch.setattr(accountant, "PRV_MAX_CELLS", 2 * size - 1)
    assert prv_eps_error(history, 1e-5) > PRV_EPS_ERROR


def test_a_grid_over_the_bound_runs_prv_at_a_wider_error_still_an_upper_bound(monkeypatch):
    """(Bounds lowered so that a cheap history crosses them.) A wider error: a bigger upper end, never below PLD."""
    import opacus.accountants.prv as opacus_prv

    event = SgmEvent(1.0, 0.01, 1000)
    usual = epsilon([event], delta=1e-5)
    monkeypatch.setattr(accountant, "PRV_MAX_GRID", 4 * 10**4)  # the usual grid is 1.3e5 points
    widened = prv_eps_error([(1.0, 0.01, 1000)], 1e-5)
    assert PRV_EPS_ERROR < widened <= PRV_MAX_EPS_ERROR
    sizes, discretize = [], opacus_prv.discretize
    monkeypatch.setattr(opacus_prv, "discretize", lambda tprv, domain: sizes.append(domain.size) or
                        discretize(tprv, domain))
    wide = epsilon([event], delta=1e-5)
    assert sizes == [sizes[0]] and sizes[0] <= 4 * 10**4
    assert pld_epsilon([event], 1e-5) * 0.995 <= usual <= wide <= usual + 2 * widened
    monkeypatch.setattr(accountant, "PRV_MAX_GRID", 10**4)  # more than 10x over: not even at the widest error
    assert prv_eps_error([(1.0, 0.01, 1000)], 1e-5) is None
    assert epsilon([event], delta=1e-5) == epsilon([event], delta=1e-5, accountant="rdp")


@pytest.mark.parametrize("sigma, count, delta", [(7.07, 1, 1e-5), (3.0, 4, 1e-5), (10.0, 2, 1e-6)])
def test_the_plain_gaussian_of_a_dp_evaluation_matches_pld(sigma, count, delta):
    """A DP evaluation is an un-subsampled Gaussian (q = 1, one step per answer): the same accountant holds."""
    from dp_accounting import dp_event, pld

    reference = pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(dp_event.GaussianDpEvent(sigma), count)
    ours = epsilon([SgmEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)] * count, delta=delta)
    expected = reference.get_epsilon(delta)
    assert expected * 0.995 <= ours <= expected * 1.02 + 0.011  # PRV: the upper end of its 0.01 error interval
