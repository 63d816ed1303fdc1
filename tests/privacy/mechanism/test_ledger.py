import json
import math

import pytest

from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.calibrate import noise_for_budget, planned_epsilon
from privacy.mechanism.ledger import Entry, Ledger, fingerprint
from privacy.mechanism.policy import decide, default_delta
from slm.errors import UserError


def entry(run="r1", rnd=1, sigma=1.0, q=0.05, steps=10):
    return Entry(run_id=run, round=rnd, noise_multiplier=sigma, clip_norm=1.0, sample_rate=q, steps=steps,
                 delta=0.0, epsilon_after=0.0, epsilon_rdp_after=0.0, max_epsilon=8.0, status="")


def open_ledger(directory, records=(1, 2, 3)):
    rows = [{"x": r} for r in records]
    return Ledger.open(directory, fingerprint=fingerprint(rows), records=len(rows), delta=1e-5)


def test_reserve_commit_and_reopen_continue_the_spend(tmp_path):
    ledger = open_ledger(tmp_path)
    first = ledger.commit(ledger.reserve(entry(rnd=1)))
    again = open_ledger(tmp_path)  # a new process / a new run on the same data
    assert [e.status for e in again.entries] == ["committed"]
    second = again.commit(again.reserve(entry(run="r2", rnd=1)))
    assert second.epsilon_after > first.epsilon_after
    assert second.epsilon_after == pytest.approx(
        epsilon([SgmEvent(1.0, 0.05, 20)], delta=1e-5), rel=1e-9)
    assert second.epsilon_rdp_after >= second.epsilon_after


def test_reserved_spend_counts_even_if_never_committed(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.reserve(entry())  # the training process dies here
    assert open_ledger(tmp_path).spent() == pytest.approx(epsilon([SgmEvent(1.0, 0.05, 10)], delta=1e-5))


def test_refusal_spends_nothing(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry()))
    spent = ledger.spent()
    refused = ledger.refuse(entry(rnd=2), "budget exhausted")
    assert refused.status == "refused" and refused.steps == 0 and ledger.spent() == spent


def test_other_data_gets_its_own_ledger(tmp_path):
    a = open_ledger(tmp_path, records=(1, 2, 3))
    a.commit(a.reserve(entry()))
    b = open_ledger(tmp_path, records=(1, 2, 4))
    assert b.path != a.path and b.spent() == 0.0


def test_fingerprint_depends_on_content_and_order():
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert fingerprint(rows) == fingerprint([{"b": "x", "a": 1}, {"b": "y", "a": 2}])
    assert fingerprint(rows) != fingerprint(rows[::-1])


def test_corrupt_ledger_is_a_clear_error(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry()))
    ledger.path.write_text(ledger.path.read_text()[:40])
    with pytest.raises(UserError, match=r"ledger .*corrupt JSON"):
        open_ledger(tmp_path)


def test_written_file_is_complete_json(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.reserve(entry())
    data = json.loads(ledger.path.read_text())
    assert data["format"] == "fedslm-ledger/1" and data["entries"][0]["sampling"] == "poisson"
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
    ledger.commit(ledger.reserve(big))
    decision = decide(ledger, max_epsilon=ledger.spent(), requested_sigma=0.0, target_epsilon=0.0,
                      sample_rate=0.2, steps=200, rounds_left=1)
    assert decision.refused and "budget exhausted" in decision.reason
    assert not math.isnan(decision.planned_epsilon)


def test_noise_cap_turns_crumbs_of_budget_into_a_refusal(tmp_path):
    """eps 0.9995 of 1 still admits a sigma~15 round; above the client's cap it refuses."""
    ledger = open_ledger(tmp_path)
    ledger.commit(ledger.reserve(entry(sigma=1.2734375, q=0.0625, steps=6)))
    assert 0.99 < ledger.spent() < 1.0
    common = dict(max_epsilon=1.0, requested_sigma=0.0, target_epsilon=0.0, sample_rate=0.0625, steps=6,
                  rounds_left=1)
    lenient = decide(ledger, max_noise_multiplier=20.0, **common)
    assert not lenient.refused and 5.0 < lenient.noise_multiplier <= 20.0 and lenient.planned_epsilon <= 1.0
    strict = decide(ledger, max_noise_multiplier=5.0, **common)
    assert strict.refused and "sigma > 5" in strict.reason
