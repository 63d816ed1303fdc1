import json
import math
import time

import pytest

from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.calibrate import noise_for_budget, planned_epsilon
from privacy.mechanism.ledger import Entry, Ledger, fingerprint
from privacy.mechanism.ledger_file import LedgerError
from privacy.mechanism.policy import decide, default_delta

BUDGET = 1e9  # the policy's budget checks are tested separately


def entry(run="r1", rnd=1, sigma=1.0, q=0.05, steps=10):
    return Entry(run_id=run, round=rnd, noise_multiplier=sigma, clip_norm=1.0, sample_rate=q, steps=steps,
                 delta=0.0, epsilon_after=0.0, epsilon_rdp_after=0.0, max_epsilon=8.0, status="")


def open_ledger(directory, records=(1, 2, 3)):
    rows = [{"x": r} for r in records]
    return Ledger.open(directory, fingerprint=fingerprint(rows), records=len(rows), delta=1e-5)


def test_reserve_commit_and_reopen_continue_the_spend(tmp_path):
    ledger = open_ledger(tmp_path)
    first = ledger.commit(ledger.reserve(entry(rnd=1), budget=BUDGET))
    again = open_ledger(tmp_path)  # a new process / a new run on the same data
    assert [e.status for e in again.entries] == ["committed"]
    second = again.commit(again.reserve(entry(run="r2", rnd=1), budget=BUDGET))
    assert second.epsilon_after > first.epsilon_after
    assert second.epsilon_after == pytest.approx(
        epsilon([SgmEvent(1.0, 0.05, 20)], delta=1e-5), rel=1e-9)
    from test_accountant import pld_epsilon  # an independent accountant, composing the two rounds one by one

    reference = pld_epsilon([SgmEvent(1.0, 0.05, 10)] * 2, 1e-5)
    assert reference * 0.995 <= second.epsilon_after <= reference * 1.02, (second.epsilon_after, reference)
    assert second.epsilon_rdp_after >= second.epsilon_after


def test_reserved_spend_counts_even_if_never_committed(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.reserve(entry(), budget=BUDGET)  # the training process dies here
    assert open_ledger(tmp_path).spent() == pytest.approx(epsilon([SgmEvent(1.0, 0.05, 10)], delta=1e-5))


def test_refusal_spends_nothing(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry(), budget=BUDGET))
    spent = ledger.spent()
    refused = ledger.refuse(entry(rnd=2), "budget exhausted")
    assert refused.status == "refused" and refused.steps == 0 and ledger.spent() == spent


def test_other_data_is_the_same_ledger_and_trains_only_once_the_operator_confirms(tmp_path):
    a = open_ledger(tmp_path, records=(1, 2, 3))
    first = a.commit(a.reserve(entry(), budget=BUDGET))
    b = open_ledger(tmp_path, records=(1, 2, 3, 4))  # a record appended, or the split moved
    assert b.path == a.path and b.spent() == first.epsilon_after and b.data_changed
    refused = b.reserve(entry(rnd=2), budget=BUDGET)
    assert refused.status == "refused" and "changed since the ledger last accepted them (3 -> 4" in refused.reason
    assert b.spent() == first.epsilon_after  # refused: nothing spent, nothing reset
    b.confirm_data()
    c = open_ledger(tmp_path, records=(1, 2, 3, 4))
    assert not c.data_changed and [d.how for d in c.data] == ["first use", "confirmed by the operator"]
    second = c.reserve(entry(rnd=3), budget=BUDGET)
    assert second.status == "reserved" and second.epsilon_after > first.epsilon_after


def test_the_budget_is_checked_inside_the_reservation_whatever_the_round_numbers(tmp_path):
    ledger = open_ledger(tmp_path)
    one = ledger.commit(ledger.reserve(entry(sigma=1.0, q=0.05, steps=100), budget=BUDGET))
    over = ledger.reserve(entry(run="r2", rnd=99, sigma=1.0, q=0.05, steps=100), budget=one.epsilon_after * 1.01)
    assert over.status == "refused" and "over the budget" in over.reason and ledger.spent() == one.epsilon_after


def test_concurrent_writers_never_lose_a_spend(tmp_path):
    """Two runs on one ledger (threads here, processes in the deployment test): every reservation lands."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name):
        for rnd in range(6):
            ledger = open_ledger(tmp_path)  # each round re-opens, as a ClientApp process does
            ledger.commit(ledger.reserve(entry(run=name, rnd=rnd), budget=BUDGET))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, ["a", "b"]))
    final = open_ledger(tmp_path)
    assert sorted((e.run_id, e.round) for e in final.entries) == sorted(
        (name, rnd) for name in "ab" for rnd in range(6))
    assert final.spent() == pytest.approx(epsilon([SgmEvent(1.0, 0.05, 120)], delta=1e-5))


def test_a_format_1_ledger_is_imported_and_its_spend_counts(tmp_path):
    old = {"format": "fedslm-ledger/1", "dataset": {"fingerprint": "f" * 64, "records": 3}, "delta": 1e-5,
           "entries": [{**entry(sigma=1.0, q=0.05, steps=10).__dict__, "status": "committed"}]}
    (tmp_path / "ledger-ffffffffffffffff.json").write_text(json.dumps(old))
    ledger = open_ledger(tmp_path)
    assert ledger.spent() == pytest.approx(epsilon([SgmEvent(1.0, 0.05, 10)], delta=1e-5))
    assert ledger.data_changed  # the old fingerprint is not these records: the operator confirms first


def test_fingerprint_depends_on_content_and_order():
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert fingerprint(rows) == fingerprint([{"b": "x", "a": 1}, {"b": "y", "a": 2}])
    assert fingerprint(rows) != fingerprint(rows[::-1])


def test_corrupt_ledger_is_a_clear_error(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry(), budget=BUDGET))
    ledger.path.write_text(ledger.path.read_text()[:40])
    with pytest.raises(LedgerError, match=r"ledger .*corrupt JSON"):
        open_ledger(tmp_path)


def test_written_file_is_complete_json(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.reserve(entry(), budget=BUDGET)
    data = json.loads(ledger.path.read_text())
    assert data["format"] == "fedslm-ledger/2" and data["entries"][0]["sampling"] == "poisson"
    assert not list(tmp_path.glob("*.tmp"))


def test_default_delta_is_well_below_one_over_n():
    for n in (10, 225, 10_000, 10**7):
        assert default_delta(n) <= 0.1 / n and default_delta(n) <= 1e-5


def test_server_request_for_less_noise_is_overridden(tmp_path):
    ledger = open_ledger(tmp_path)
    decision = decide(ledger, max_epsilon=2.0, requested_sigma=0.1, target_epsilon=0.0, sample_rate=0.05,
                      steps=10, rounds_left=3)
    assert decision.noise_multiplier == noise_for_budget([], budget=2.0, sample_rate=0.05, steps_per_round=10,
                                                         rounds_left=3, delta=ledger.delta) > 0.1
    assert decision.planned_epsilon <= 2.0


def test_a_request_that_fits_is_taken_as_it_is(tmp_path):
    ledger = open_ledger(tmp_path)
    decision = decide(ledger, max_epsilon=8.0, requested_sigma=1.5, target_epsilon=0.0, sample_rate=0.05,
                      steps=10, rounds_left=3)
    assert decision.noise_multiplier == 1.5
    assert decision.planned_epsilon == planned_epsilon([], 1.5, sample_rate=0.05, steps_per_round=10, rounds_left=3,
                                                       delta=ledger.delta) <= 8.0


def test_server_request_for_more_noise_is_honoured(tmp_path):
    ledger = open_ledger(tmp_path)
    decision = decide(ledger, max_epsilon=8.0, requested_sigma=5.0, target_epsilon=0.0, sample_rate=0.05,
                      steps=10, rounds_left=3)
    assert decision.noise_multiplier == 5.0


def test_client_at_its_limit_refuses(tmp_path):
    ledger = open_ledger(tmp_path)
    big = entry(sigma=0.5, q=0.2, steps=200)
    ledger.commit(ledger.reserve(big, budget=BUDGET))
    decision = decide(ledger, max_epsilon=ledger.spent(), requested_sigma=0.0, target_epsilon=0.0,
                      sample_rate=0.2, steps=200, rounds_left=1)
    assert decision.refused and "budget exhausted" in decision.reason
    assert not math.isnan(decision.planned_epsilon)


def test_noise_cap_turns_crumbs_of_budget_into_a_refusal(tmp_path):
    """eps 0.9995 of 1 still admits a sigma~15 round; above the client's cap it refuses."""
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry(sigma=1.2734375, q=0.0625, steps=6), budget=BUDGET))
    assert 0.99 < ledger.spent() < 1.0
    common = dict(max_epsilon=1.0, requested_sigma=0.0, target_epsilon=0.0, sample_rate=0.0625, steps=6,
                  rounds_left=1)
    lenient = decide(ledger, max_noise_multiplier=20.0, **common)
    assert not lenient.refused and 5.0 < lenient.noise_multiplier <= 20.0 and lenient.planned_epsilon <= 1.0
    strict = decide(ledger, max_noise_multiplier=5.0, **common)
    assert strict.refused and "sigma > 5" in strict.reason


def test_a_tiny_requested_sigma_is_never_evaluated_as_it_is(tmp_path, monkeypatch):
    """PRV at sigma 0.01 takes minutes and GiBs: a coordinator asking for it must not make the site compute it."""
    import privacy.mechanism.policy as policy
    from privacy.mechanism.calibrate import SIGMA_MIN

    seen, real = [], policy.planned_epsilon
    monkeypatch.setattr(policy, "planned_epsilon",
                        lambda past, sigma, **kw: seen.append(sigma) or real(past, sigma, **kw))
    decision = decide(open_ledger(tmp_path), max_epsilon=8.0, requested_sigma=0.01, target_epsilon=0.0,
                      sample_rate=0.05, steps=10, rounds_left=3)
    assert seen and min(seen) >= SIGMA_MIN and decision.noise_multiplier >= SIGMA_MIN


@pytest.fixture
def no_accounting_of_the_request(monkeypatch):
    import privacy.mechanism.policy as policy

    for name in ("planned_epsilon", "noise_for_budget"):
        monkeypatch.setattr(policy, name, lambda *a, **k: pytest.fail("the request was accounted"))


def test_a_round_of_more_than_100_epochs_is_refused_before_any_accounting(tmp_path, no_accounting_of_the_request):
    """The coordinator's sigma 0.3, q 0.5, 10^5 steps: one PRV evaluation of it took 130 s and 10.8 GB."""
    started = time.monotonic()
    decision = decide(open_ledger(tmp_path), max_epsilon=8.0, requested_sigma=0.3, target_epsilon=0.0,
                      sample_rate=0.5, steps=10**5, rounds_left=1)
    assert decision.refused and decision.planned_epsilon == 0.0
    assert decision.reason == ("100000 steps at sample rate 0.5 would show each record 5e+04 times on average in one "
                               "round; this site allows at most 100")
    assert time.monotonic() - started < 10


def test_a_hostile_request_within_the_bounds_is_decided_without_prv(tmp_path, monkeypatch):
    """100 epochs a round (allowed: it reaches the accountant) planned over 1000 rounds at sigma 0.3: refused from
    the RDP bound, fast."""
    from opacus.accountants import PRVAccountant

    monkeypatch.setattr(PRVAccountant, "get_epsilon", lambda self, *a, **k: pytest.fail(f"PRV ran on {self.history}"))
    ledger = open_ledger(tmp_path)
    started = time.monotonic()
    decision = decide(ledger, max_epsilon=8.0, requested_sigma=0.3, target_epsilon=0.0, sample_rate=0.5, steps=200,
                      rounds_left=1000)
    assert decision.refused and "budget exhausted" in decision.reason and "sigma > 5" in decision.reason
    refused = ledger.reserve(entry(sigma=0.3, q=0.5, steps=10**5), budget=8.0)  # the check inside the lock, too
    assert refused.status == "refused" and refused.reason.startswith("budget exhausted")
    assert time.monotonic() - started < 10  # a generous bound: ~1 s here
