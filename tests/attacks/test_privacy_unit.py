"""A site that protects patients, not records (client.units), against a hostile coordinator.

The unit field and k are the site's node config; the coordinator can neither name, change
nor learn them beyond what the report states (the unit's word, k, the unit count that the
sample rate already releases). The ledger accounts at the unit rate, under the unit, and
never mixes units.
"""

import json
from collections import Counter

import pytest
from coordinator import Coordinator, Site, independent_epsilon, wire_text

from client.confirm import confirm_data
from fedslm.common.errors import UserError
from privacy.mechanism.policy import default_delta

PATIENTS = {f"mrn-{p:04d}": n for p, n in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 2, 2])}  # 40 records, 10 patients


def patient_file(path):
    rows = [{"question": f"Note {i} of {mrn}: what is condition {i}?", "answer": f"Condition {i} is rare.",
             "patient_id": mrn} for mrn, n in PATIENTS.items() for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def coordinator():
    return Coordinator()


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path / "ward", max_epsilon=3.0, extra={"privacy-unit-field": "patient_id",
                                                              "max-records-per-unit": 3,
                                                              "privacy-unit-name": "patient", "test-fraction": 0.2})
    patient_file(site.data)
    return site


def _node_toml(site) -> object:
    toml = site.root / "node.toml"
    toml.write_text("".join(f'"{k}" = "{v}"\n' if isinstance(v, str) else f'"{k}" = {v}\n'
                            for k, v in site.node_config.items()))
    return toml


def test_a_patient_level_site_accounts_at_the_patient_rate_and_sends_no_patient_column(site, coordinator):
    coordinator.replies.clear()
    reply = coordinator.train(site)
    privacy = dict(reply.content["privacy"])
    assert privacy["status"] == "committed"
    assert privacy["unit"] == "patient" and privacy["records_per_unit"] == 3
    units = privacy["units"]
    assert 1 <= units < sum(PATIENTS.values()) and privacy["records"] > units  # patients, not records, are sampled
    assert privacy["sample_rate"] == pytest.approx(4 / units)  # train.batch-size 4 = expected patients
    entry = site.ledger()["entries"][-1]
    assert entry["unit"] == "unit:patient_id" and entry["records_per_unit"] == 3
    assert entry["sample_rate"] == privacy["sample_rate"] and entry["delta"] == default_delta(units)
    text = wire_text(reply)
    assert "patient_id" not in text and "mrn-" not in text  # the column and its values never leave
    assert independent_epsilon([privacy], delta=privacy["delta"]) <= site.max_epsilon + 0.02


def test_the_coordinator_cannot_change_the_unit_k_or_train_on_the_unit_column(site, coordinator, capsys):
    coordinator.replies.clear()
    reply = coordinator.train(site, {"dp.privacy-unit-field": "answer", "dp.max-records-per-unit": 1000,
                                     "dp.privacy-unit-name": "record"})
    privacy = dict(reply.content["privacy"])
    assert privacy["status"] == "committed" and privacy["unit"] == "patient" and privacy["records_per_unit"] == 3
    assert site.ledger()["entries"][-1]["unit"] == "unit:patient_id"
    log = capsys.readouterr().err
    assert "ignored the coordinator's dp.privacy-unit-field" in log and "dp.max-records-per-unit=1000" in log
    for field in ("data.prompt-field", "data.response-field"):
        refused = coordinator.train(site, {field: "patient_id"}, run_id=f"leak-{field}")
        assert refused.content["privacy"]["code"] == "request-out-of-bounds"
        assert "arrays" not in refused.content and "patient_id" not in wire_text(refused)


def test_a_ledger_never_mixes_units(site, coordinator, capsys):
    """Switching a spent patient-level ledger to records (or back) is refused, and confirm-data cannot do it."""
    coordinator.replies.clear()
    assert coordinator.train(site).content["privacy"]["status"] == "committed"
    del site.node_config["privacy-unit-field"]
    refused = coordinator.train(site, server_round=2)
    assert refused.content["privacy"]["code"] == "data-changed" and "arrays" not in refused.content
    assert "privacy unit changed from 'unit:patient_id' to 'record'" in capsys.readouterr().err
    with pytest.raises(UserError, match="never composes releases of two units"):
        confirm_data(_node_toml(site))
    entries = site.ledger()["entries"]
    assert {e["unit"] for e in entries if e["status"] == "committed"} == {"unit:patient_id"}
    site.node_config["ledger-dir"] = str(site.root / "record-level-ledger")  # the new guarantee, deliberately
    assert coordinator.train(site, server_round=2).content["privacy"]["unit"] == "record"


def test_a_unit_change_before_any_spend_needs_no_new_ledger(site, coordinator):
    """Only a refused round under records (nothing spent, no data version): the site may choose patients."""
    site.node_config.pop("privacy-unit-field")
    site.node_config["max-epsilon"] = 1e-6
    coordinator.replies.clear()
    assert coordinator.train(site).content["privacy"]["status"] == "refused"
    site.node_config.update({"privacy-unit-field": "patient_id", "max-epsilon": 3.0})
    assert "nothing to confirm" in confirm_data(_node_toml(site))
    assert coordinator.train(site, server_round=2).content["privacy"]["unit"] == "patient"
    assert site.ledger()["data"][-1]["unit"] == "unit:patient_id"


def test_confirm_data_accepts_changed_records_under_the_same_unit(site, coordinator):
    coordinator.replies.clear()
    assert coordinator.train(site).content["privacy"]["status"] == "committed"
    with site.data.open("a") as handle:
        handle.write("".join(json.dumps({"question": f"late note {i}?", "answer": "yes", "patient_id": f"new-{i}"})
                             + "\n" for i in range(6)))
    assert coordinator.train(site, server_round=2).content["privacy"]["code"] == "data-changed"
    assert "patients" in confirm_data(_node_toml(site))
    again = dict(coordinator.train(site, server_round=2).content["privacy"])
    assert again["status"] == "committed" and again["unit"] == "patient"


def test_a_patients_records_are_all_trained_on_or_all_held_out(site):
    from dataclasses import replace

    from client.data import load_local_data
    from client.site import SitePolicy
    from fedslm.common.config import resolve
    from fedslm.common.vocabulary import RunConfig

    policy = SitePolicy.from_node_config(site.node_config)
    local = load_local_data(policy.data_spec(RunConfig.parse(resolve({}))), 0, 1)
    train = Counter(r["patient_id"] for r in local.train)
    test = Counter(r["patient_id"] for r in local.test)
    assert test and train and not set(train) & set(test)
    assert {**train, **test} == PATIENTS  # every record of every patient on one side
    sim = load_local_data(replace(policy.data_spec(RunConfig.parse(resolve({}))), split="seeded", seed=3), 0, 1)
    assert not {r["patient_id"] for r in sim.train} & {r["patient_id"] for r in sim.test}


def test_a_dp_evaluation_on_a_patient_site_is_charged_per_patient(tmp_path, coordinator):
    site = Site(tmp_path / "eval-ward", extra={"privacy-unit-field": "patient_id", "evaluate": "dp",
                                               "max-eval-examples": 0, "test-fraction": 0.5})
    patient_file(site.data)
    coordinator.replies.clear()
    reply = coordinator.evaluate(site)
    entry = site.ledger()["entries"][-1]
    assert entry["mechanism"] == "dp-evaluation" and entry["unit"] == "unit:patient_id"
    held_out_patients = float(reply.content["metrics"]["eval_examples"])
    assert 1 <= held_out_patients < float(reply.content["metrics"]["num-examples"])  # n = patients, not records


def test_a_site_cannot_offer_its_unit_column_as_a_task_field(tmp_path):
    from client.site import SitePolicy

    site = Site(tmp_path / "bad", extra={"privacy-unit-field": "patient_id",
                                         "fields": "question,answer,patient_id"})
    with pytest.raises(UserError, match="'fields' must not list 'patient_id'"):
        SitePolicy.from_node_config(site.node_config)


def test_a_deployed_site_sends_neither_its_group_size_nor_why_its_unit_column_failed(tmp_path, coordinator, capsys):
    """The group size (a statistic of the records) stays in the site's own `fedslm budget`; a unit column
    missing from the file is an internal error whose detail (column names) stays in the site's log."""
    clinic = Site(tmp_path / "clinic", extra={"group-field": "patient_id"})
    patient_file(clinic.data)
    reply = coordinator.train(clinic)
    assert reply.content["privacy"]["status"] == "committed" and reply.content["privacy"]["group_records"] == 0
    kept = clinic.ledger()["entries"][-1]["group_records"]  # on the site's disk, for its own budget statement
    assert 2 <= kept <= max(PATIENTS.values())  # the largest patient's training records (the split holds some out)
    broken = Site(tmp_path / "broken", extra={"privacy-unit-field": "mrn"})
    patient_file(broken.data)
    failed = coordinator.train(broken)
    text = wire_text(failed)
    assert failed.content["privacy"]["code"] == "internal-error"
    assert "mrn" not in text and "patient_id" not in text and "question" not in text
    assert "privacy unit field 'mrn' is missing" in capsys.readouterr().err
