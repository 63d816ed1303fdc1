"""The privacy report of a synthetic run directory: schema, recomputed epsilons, self-contained HTML, bad input.

The run directory is written by hand (config.json, metrics.jsonl, privacy/ledger.json,
events.jsonl) next to real client ledgers (privacy.mechanism.ledger.Ledger), so no training runs.
"""

import base64
import functools
import json
import re
import shutil

import pytest

from fedslm.cli.main import main
from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.ledger import DataVersion, Entry, Ledger, fingerprint
from privacy.report.build import SCHEMA, build_report, write_report

SIGMA = {"alpha": 1.0, "beta": 1.3}
RATE, STEPS, DELTA, RECORDS = 0.1, 2, 1e-5, 40


def _client_events(name: str, rounds: int) -> list[SgmEvent]:
    return [SgmEvent(noise_multiplier=SIGMA[name], sample_rate=RATE, steps=STEPS)] * rounds


@functools.cache
def _epsilon(name: str, rounds: int, accountant: str) -> float:
    return epsilon(_client_events(name, rounds), delta=DELTA, accountant=accountant)


def _write_run(run, *, rounds: int = 2, planned: int = 2, user_dp: bool = False):
    """A run of ``rounds`` completed rounds with two DP clients whose ledgers live in the run directory."""
    run.mkdir(parents=True)
    config = resolve({"run.id": run.name, "run.root": str(run.parent), "server.rounds": planned,
                      "user-dp.enabled": user_dp, "dp.max-epsilon": 20.0})
    (run / "config.json").write_text(json.dumps(config))
    view = {"clients": {}, "user_level": [], "exhausted": []}
    for name in SIGMA:
        ledger = Ledger.open(run / "ledgers" / name, fingerprint=fingerprint([{"client": name}]), records=RECORDS,
                             delta=DELTA)
        for rnd in range(1, rounds + 1):
            # what Ledger.reserve + commit write, with the epsilons computed once per test session
            entry = Entry(run_id=run.name, round=rnd, noise_multiplier=SIGMA[name], clip_norm=1.0, sample_rate=RATE,
                          steps=STEPS, delta=DELTA, epsilon_after=_epsilon(name, rnd, "prv"),
                          epsilon_rdp_after=_epsilon(name, rnd, "rdp"), max_epsilon=20.0, status="committed")
            ledger.entries.append(entry)
            view["clients"].setdefault(name, []).append({
                "round": rnd, "client": name, "dp": True, "noise_seed": "os-entropy", "noise_generator": "chacha20", "status": entry.status,
                "noise_multiplier": entry.noise_multiplier, "clip_norm": entry.clip_norm,
                "sample_rate": entry.sample_rate, "steps": entry.steps, "delta": entry.delta,
                "epsilon": entry.epsilon_after, "epsilon_rdp": entry.epsilon_rdp_after, "max_epsilon": 20.0,
                "accountant": "prv", "sampling": "poisson", "records": RECORDS, "reason": ""})
        ledger.save()
    (run / "privacy").mkdir()
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    rows = [{"round": 0, "eval_loss": 3.0, "eval_clients": _evals(3.0)}]
    for rnd in range(1, rounds + 1):
        row = {"round": rnd, "sampled": 2, "participants": [
            {"client": n, "train_loss": 3.0, "num-examples": RECORDS, "steps": STEPS, "seconds": 1.0,
             "update_norm": 0.5} for n in SIGMA], "refused": [], "failed": [], "rejected": [],
            "bytes_up": 10, "bytes_down": 10, "eval_loss": 3.0 - 0.1 * rnd, "eval_clients": _evals(3.0 - 0.1 * rnd)}
        if user_dp:
            row["user_dp"] = {"round": rnd, "clip_norm": 0.5, "noise_multiplier": 1.0, "sample_rate": 0.5,
                              "eligible": 2, "cohort": 1, "delta": DELTA,
                              "epsilon": epsilon([SgmEvent(1.0, 0.5, 1)] * rnd, delta=DELTA), "accountant": "prv",
                              "sampling": "poisson"}
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    event = {"event": "finished", "rounds": rounds} if rounds == planned else \
        {"event": "stopped", "rounds": rounds, "stopped": "only 0 clients still have budget (min-clients 2)"}
    (run / "events.jsonl").write_text(json.dumps({"time": "2026-01-01T00:00:00Z", **event}) + "\n")
    return run


def _evals(loss: float) -> dict:
    return {n: {"eval_loss": loss, "eval_tokens": 100.0, "eval_examples": 4.0, "num-examples": 4} for n in SIGMA}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("runs") / "finished")


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run, free to damage."""
    return shutil.copytree(finished, tmp_path / "finished")


def test_report_json_has_the_schema_and_epsilons_recomputed_from_the_events(run):
    html = write_report(run)
    doc = json.loads((run / "report.json").read_text())
    assert html == run / "report.html" and doc["schema"] == SCHEMA
    assert doc["audit"] is None and doc["user_level"] is None and not doc["run"]["partial"]
    assert doc["accounting"]["disagreements"] == []
    for name in SIGMA:
        client = doc["clients"][name]
        assert client["epsilon"] == pytest.approx(epsilon(_client_events(name, 2), delta=DELTA), rel=1e-9)
        assert client["epsilon_rdp"] == pytest.approx(
            epsilon(_client_events(name, 2), delta=DELTA, accountant="rdp"), rel=1e-9)
        assert [r["epsilon"] for r in client["rounds"]] == pytest.approx(
            [epsilon(_client_events(name, k), delta=DELTA) for k in (1, 2)], rel=1e-9)
        assert client["records"] == RECORDS and client["delta"] == DELTA and client["budget"] == 20.0
        assert client["remaining"] == pytest.approx(20.0 - client["epsilon"])
        assert any(f"client {name} ({RECORDS} records) is protected with (ε, δ) = ({client['epsilon']:.2f}, 1e-5)"
                   in s for s in doc["summary"]["guarantees"])
    assert set(doc["plots"]) == {"epsilon", "noise", "utility", "privacy_utility"}
    for relative in doc["plots"].values():
        assert (run / relative).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_html_is_self_contained_with_png_data_uris(run):
    page = write_report(run).read_text()
    assert "<style>" in page and "<link" not in page and "<script" not in page and "url(" not in page
    references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert references and all(ref.startswith("data:image/png;base64,") for ref in references)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?https?://", page)
    for ref in references:
        assert base64.b64decode(ref.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "no empirical audit was run for this run" in page.lower()


def test_a_stopped_run_is_reported_as_partial(tmp_path):
    run = _write_run(tmp_path / "stopped", rounds=1, planned=3)
    doc, _ = build_report(run)
    assert doc["run"]["partial"] and "stopped early: only 0 clients still have budget" in doc["run"]["partial_reason"]
    assert doc["summary"]["partial"].startswith("PARTIAL RUN: only 1 of 3 planned rounds trained")
    assert "PARTIAL RUN" in write_report(run).read_text()


def test_a_run_without_an_end_event_and_missing_rounds_is_partial(run):
    (run / "events.jsonl").unlink()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # crashed during round 2
    doc, _ = build_report(run)
    assert doc["run"]["partial"] and "no end of the run" in doc["run"]["partial_reason"]


@pytest.mark.parametrize("damage, named", [
    (lambda run: (run / "config.json").unlink(), "config.json"),
    (lambda run: (run / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "eval\n'), "metrics.jsonl: line 2"),
    (lambda run: (run / "privacy" / "ledger.json").write_text("{not json"), "ledger.json"),
    (lambda run: (run / "privacy" / "ledger.json").unlink(), "ledger.json"),
    (lambda run: (run / "events.jsonl").write_text("[1, 2]\n"), "events.jsonl"),
    (lambda run: next((run / "ledgers" / "beta").glob("ledger*.json")).write_text("{}"), "ledgers/beta/ledger"),
])
def test_missing_or_corrupt_files_give_one_line_naming_the_file(run, damage, named):
    damage(run)
    with pytest.raises(UserError) as err:
        build_report(run)
    assert named in str(err.value) and "\n" not in str(err.value)
    assert main(["report", str(run)]) == 2


def test_user_level_section_appears_only_with_user_dp_rows(finished, tmp_path):
    doc, _ = build_report(finished)
    assert doc["user_level"] is None
    run = _write_run(tmp_path / "user-dp", user_dp=True)
    doc, _ = build_report(run)
    assert doc["user_level"]["epsilon"] == pytest.approx(epsilon([SgmEvent(1.0, 0.5, 1)] * 2, delta=DELTA))
    assert [r["cohort"] for r in doc["user_level"]["rounds"]] == [1, 1]
    assert "User-level DP (whole clients" in write_report(run).read_text()
    assert "User-level DP (whole clients" not in write_report(finished).read_text()


def test_a_reported_epsilon_that_disagrees_with_the_events_is_flagged(run):
    view = json.loads((run / "privacy" / "ledger.json").read_text())
    view["clients"]["alpha"][1]["epsilon"] = 0.5  # claims less than its events give
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    assert len(doc["accounting"]["disagreements"]) == 1 and "alpha round 2" in doc["accounting"]["disagreements"][0]
    assert doc["summary"]["check"].startswith("WARNING")


def test_without_client_ledgers_the_server_view_is_recomputed_and_earlier_spend_kept(run):
    shutil.rmtree(run / "ledgers")  # a deployment: the server never sees the clients' ledgers
    view = json.loads((run / "privacy" / "ledger.json").read_text())
    for record in view["clients"]["beta"]:
        record["epsilon"] += 1.0  # beta had spent on the same data in an earlier run
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    alpha, beta = doc["clients"]["alpha"], doc["clients"]["beta"]
    assert alpha["recomputed"] and alpha["source"].startswith("server view")
    assert alpha["epsilon"] == pytest.approx(epsilon(_client_events("alpha", 2), delta=DELTA))
    assert not beta["recomputed"] and beta["epsilon"] == pytest.approx(view["clients"]["beta"][-1]["epsilon"])
    assert beta["epsilon_run"] == pytest.approx(epsilon(_client_events("beta", 2), delta=DELTA))
    assert doc["accounting"]["disagreements"] == []


def test_a_client_that_only_evaluated_is_listed_as_not_trained(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["eval_clients"]["gamma"] = {"eval_loss": 3.0, "eval_tokens": 10.0, "eval_examples": 4.0, "num-examples": 4}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc, _ = build_report(run)
    assert doc["clients"]["gamma"] == {"trained": False, "eval_records": 4}
    assert "3 clients; 2 of them trained" in doc["summary"]["what"][1]
    assert any(s.startswith("Client gamma was not selected for training") for s in doc["summary"]["guarantees"])


def test_a_client_without_dp_has_no_guarantee(run):
    view = json.loads((run / "privacy" / "ledger.json").read_text())
    view["clients"]["beta"] = [{"round": r, "client": "beta", "dp": False, "status": "no-dp", "sample_rate": RATE,
                                "steps": STEPS} for r in (1, 2)]
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    assert doc["clients"]["beta"]["epsilon"] is None
    assert any("beta" in s and "WITHOUT differential privacy" in s for s in doc["summary"]["guarantees"])


def test_budget_html_renders_a_client_ledger_next_to_it(finished, tmp_path):
    source = next((finished / "ledgers" / "alpha").glob("ledger*.json"))
    ledger = shutil.copy(source, tmp_path / source.name)
    assert main(["budget", str(ledger), "--html"]) == 0
    page = (tmp_path / "budget.html").read_text()
    spent = epsilon(_client_events("alpha", 2), delta=DELTA)
    assert f"(ε, δ) = ({spent:.2f}, 1e-5)" in page
    references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert references and all(ref.startswith("data:image/png;base64,") for ref in references)
    assert main(["budget", str(ledger), "--html", str(tmp_path / "out" / "page.html")]) == 0
    assert (tmp_path / "out" / "page.html").is_file()


def test_the_neighbouring_relation_is_stated_and_the_replace_one_epsilon_reported(run):
    """add/remove-one with the record count in clear, said in report.json, the summary and the page."""
    from privacy.report.neighbouring import STATEMENT, epsilon_replace_one

    html = write_report(run).read_text()
    doc = json.loads((run / "report.json").read_text())
    accounting = doc["accounting"]
    assert accounting["neighbouring_relation"] == "add/remove one record" and accounting["record_count_in_clear"]
    assert accounting["statement"] == STATEMENT
    assert "add/remove-one-record neighbouring" in STATEMENT and "number of records is released in clear" in STATEMENT
    assert STATEMENT in html and "REPLACE_ONE" in accounting["replace_one"]
    for name in SIGMA:
        client = doc["clients"][name]
        expected = epsilon_replace_one(_client_events(name, 2), delta=DELTA)  # checked against closed forms
        assert client["epsilon_replace_one"] == pytest.approx(expected, rel=1e-9)  # in test_neighbouring.py
        assert client["epsilon_run_replace_one"] == pytest.approx(expected, rel=1e-9)
        assert client["epsilon"] < client["epsilon_replace_one"] <= 2 * client["epsilon"]
        sentence = next(s for s in doc["summary"]["guarantees"] if f"client {name} " in s)
        assert "record count is sent in clear" in sentence
        assert f"replacing one record by another, ε = {client['epsilon_replace_one']:.2f}" in sentence
        assert f"{client['epsilon_replace_one']:.3f}" in html
    assert any(n["topic"] == "Neighbouring relation" and STATEMENT in n["text"] for n in doc["protection"])


def test_replace_one_is_null_where_the_earlier_spend_is_not_in_the_files(run):
    shutil.rmtree(run / "ledgers")
    view = json.loads((run / "privacy" / "ledger.json").read_text())
    for record in view["clients"]["beta"]:
        record["epsilon"] += 1.0  # earlier spend only the client's ledger knows
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    assert doc["clients"]["beta"]["epsilon_replace_one"] is None
    assert doc["clients"]["beta"]["epsilon_run_replace_one"] > doc["clients"]["beta"]["epsilon_run"]
    assert doc["clients"]["alpha"]["epsilon_replace_one"] is not None


def test_under_user_level_dp_the_per_client_tables_are_said_to_be_outside_its_guarantee(finished, tmp_path):
    from privacy.report.text import PER_CLIENT_SECRET

    run = _write_run(tmp_path / "user-dp", user_dp=True)
    html = write_report(run).read_text()
    doc = json.loads((run / "report.json").read_text())
    secret = doc["per_client_statistics"]
    assert secret["covered_by_user_level_dp"] is False and secret["coordinator_secret"] is True
    assert secret["user_level_dp_covers"].startswith("the released models only")
    assert secret["text"] == PER_CLIENT_SECRET and "coordinator's secret material" in PER_CLIENT_SECRET
    for what in ("participation", "evaluation results", "privacy records"):
        assert what in PER_CLIENT_SECRET
    per_client = html.index("<h2>Per-client privacy</h2>")
    # next to the tables: between the section heading and the client table, and in the user-level section
    assert per_client < html.index(PER_CLIENT_SECRET.replace("'", "&#x27;"), per_client) < html.index("<table",
                                                                                                      per_client)
    user_section = html.index("User-level DP (whole clients")
    assert PER_CLIENT_SECRET.replace("'", "&#x27;") in html[user_section:html.index("<h2>", user_section + 10)]
    assert any("covers the released models only" in s for s in doc["summary"]["guarantees"])
    plain, _ = build_report(finished)
    assert plain["per_client_statistics"] is None
    assert PER_CLIENT_SECRET.replace("'", "&#x27;") not in write_report(finished).read_text()


def test_what_is_not_protected_is_listed(run):
    doc, _ = build_report(run)
    notes = {n["topic"]: n["text"] for n in doc["protection"]}
    for topic, words in [("Not protected: the record count", "in clear"),
                         ("Not protected: participation", "selected"),
                         ("Not protected: held-out evaluation records", "any adapter the coordinator sends"),
                         ("Not protected: the model architecture", "LoRA configuration"),
                         ("Not protected: settings chosen from the data", "95th-percentile"),
                         ("Not protected: timing", "how long"),
                         ("Not protected: a compromised site", "nothing about its records is protected")]:
        assert words in notes[topic], topic
    assert "pins which of its records are held out" in notes["Not protected: held-out evaluation records"]
    randomness = notes["Randomness: a cryptographic generator (ChaCha20)"]
    for words in ("ChaCha20 keystream", "RFC 8439", "256 bits of OS entropy", "privacy/mechanism/randomness.py",
                  "Box-Muller", "Not mitigated: floating-point attacks"):
        assert words in randomness, words


def test_rounds_drawn_from_the_mersenne_twister_are_reported_as_such():
    """Privacy records written before the ChaCha20 generator carry no noise_generator field: the report says
    what those rounds drew from, instead of describing today's code."""
    from privacy.report.text import protection_notes

    old = {n["topic"]: n["text"] for n in protection_notes(seeds={"os-entropy"}, generators={None, "chacha20"},
                                                           aggregation="ffa", user=None)}
    text = old["Randomness: not a cryptographic generator in some rounds"]
    assert "Mersenne Twister" in text and "reconstructed" in text


def test_rounds_whose_replies_carry_no_train_loss_are_reported(run):
    """Under DP the sites send no training metrics: no train_loss in the rows, none in the replies."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    doc, _ = build_report(run)
    assert any(n["topic"] == "Not protected: training metrics in this run's files" for n in doc["protection"])
    for row in rows:
        row.pop("train_loss", None)
        for reply in row.get("participants", []):
            reply.pop("train_loss")
            reply.pop("seconds")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = write_report(run).read_text()
    doc = json.loads((run / "report.json").read_text())
    assert [r["train_loss"] for r in doc["utility"]["rounds"]] == [None, None, None]
    assert doc["utility"]["final"]["eval_loss"] == pytest.approx(2.8)
    assert not any(n["topic"].startswith("Not protected: training metrics") for n in doc["protection"])
    assert "Per-client privacy" in html and set(doc["plots"]) == {"epsilon", "noise", "utility", "privacy_utility"}


def test_budget_statement_says_the_neighbouring_relation(finished, tmp_path, capsys):
    from privacy.report.neighbouring import STATEMENT, STATEMENT_ASCII, epsilon_replace_one

    source = next((finished / "ledgers" / "alpha").glob("ledger*.json"))
    ledger = shutil.copy(source, tmp_path / source.name)
    replace_one = epsilon_replace_one(_client_events("alpha", 2), delta=DELTA)
    assert main(["budget", str(ledger)]) == 0
    text = capsys.readouterr().out
    assert STATEMENT_ASCII in text and f"replace-one (one record swapped for another, count unchanged): eps " \
                                       f"{replace_one:.3f}" in text
    assert main(["budget", str(ledger), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["statement"] == STATEMENT and doc["record_count_in_clear"] is True
    assert doc["neighbouring_relation"] == "add/remove one record"
    assert doc["spent_epsilon_replace_one"] == pytest.approx(replace_one, rel=1e-9)
    assert main(["budget", str(ledger), "--html"]) == 0
    page = (tmp_path / "budget.html").read_text()
    assert STATEMENT in page and f"ε = {replace_one:.2f} at the same δ" in page


def test_a_shipped_file_worse_than_the_untrained_base_is_flagged_plainly(run):
    shipped = {"fp32": {"eval_loss": 2.8}, "q8_0": {"eval_loss": 2.82, "bytes": 145_000_000, "role": "merged"},
               "q4_0": {"eval_loss": 3.01, "bytes": 85_000_000, "role": "merged"},
               "base q4_0": {"eval_loss": 3.1, "bytes": 85_000_000, "role": "base"},
               "adapter+q4_0": {"eval_loss": 2.9, "bytes": 921_000, "role": "adapter"}}
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"round": 2, "shipped": shipped}) + "\n")
    html = write_report(run).read_text()
    doc = json.loads((run / "report.json").read_text())
    # round 0 evaluated at 3.0: only the Q4_0 file is worse; the install is the base itself, never flagged
    assert doc["utility"]["shipped_worse_than_base"] == [
        "round 2: q4_0: 3.0100, worse than the untrained base 3.0000 — this file loses what training gained"]
    rows = {r["model"]: r for r in doc["utility"]["shipped_vs_base"]}
    assert rows["adapter+q4_0"]["vs_device_base"] == pytest.approx(-0.2)
    assert rows["q8_0"]["vs_round0"] == pytest.approx(-0.18) and not rows["base q4_0"]["worse_than_base"]
    assert "this file loses what training gained" in html and "WORSE" in html


@pytest.mark.parametrize("planned", [1, 3])
def test_a_run_where_every_site_refused_is_partial_and_says_nothing_trained(tmp_path, planned):
    """Round 1 ran but every site refused (planned 1: the run 'finished'; planned 3: it stopped)."""
    run = _write_run(tmp_path / "refused", rounds=0, planned=planned)
    refused = [{"client": n, "reason": "budget exhausted"} for n in SIGMA]
    row = {"round": 1, "sampled": 2, "participants": [], "refused": refused, "failed": [], "rejected": [],
           "skipped": True, "bytes_up": 0, "bytes_down": 10}
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    if planned == 1:
        (run / "events.jsonl").write_text(json.dumps({"event": "finished", "rounds": 1}) + "\n")
    doc, _ = build_report(run)
    assert doc["run"]["partial"] and doc["run"]["rounds_trained"] == 0
    assert "1 round aggregated no client update: site replies 2 refused (budget exhausted)" in doc["run"][
        "partial_reason"]
    assert doc["summary"]["partial"].startswith(f"PARTIAL RUN: only 0 of {planned} planned rounds trained (1 ran)")
    assert doc["summary"]["what"][0].startswith("This run trained nothing: no round aggregated a client update")
    page = write_report(run).read_text()
    assert '<div class="banner partial">PARTIAL RUN: only 0 of' in page and "This run fine-tuned" not in page


def test_a_patient_level_client_is_stated_in_patients_and_a_record_level_one_per_person(run):
    """Issue 25 item 4: unit-level guarantees read in the site's word; record-level ones with a group
    field also state what epsilon means for the person with the most records (group privacy, computed)."""
    from privacy.report.neighbouring import epsilon_group

    view = json.loads((run / "privacy" / "ledger.json").read_text())
    for record in view["clients"]["alpha"]:
        record.update(unit="patient", records_per_unit=3, units=12)
    for record in view["clients"]["beta"]:
        record.update(group_records=4)
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    alpha, beta = doc["clients"]["alpha"], doc["clients"]["beta"]
    assert alpha["unit"] == "patient" and alpha["units"] == 12 and alpha["epsilon_group"] is None
    text = " ".join(doc["summary"]["clients"]) if isinstance(doc["summary"].get("clients"), list) else json.dumps(
        doc["summary"], ensure_ascii=False)
    assert "Each patient of client alpha (12 patients, 40 records), with all of their records (at most 3" in text
    assert "under adding or removing one patient" in text
    expected = epsilon_group(_client_events("beta", 2), delta=DELTA, group=4)
    assert beta["group_records"] == 4 and beta["epsilon_group"] == pytest.approx(expected)
    assert expected > beta["epsilon"]
    assert f"a person with 4 records (the most any one holds here) is protected only with ε = {expected:.2f}" in text
    assert "patient" in doc["accounting"]["units"] and "record" in doc["accounting"]["units"]
    unit_note = next(n for n in doc["protection"] if n["topic"] == "Unit of privacy")["text"]
    assert "protect each such unit with ALL of its records" in unit_note


def test_budget_states_a_unit_ledger_in_units_and_a_record_ledger_per_person(tmp_path, capsys):
    from privacy.report.neighbouring import epsilon_group

    events = _client_events("alpha", 1)
    for name, fields in (("ward", {"unit": "unit:patient_id", "records_per_unit": 3}),
                         ("clinic", {"group_records": 5})):
        ledger = Ledger.open(tmp_path / name, fingerprint="f", records=RECORDS, delta=DELTA,
                             unit=fields.get("unit", "record"))
        ledger.entries.append(Entry(run_id="r", round=1, noise_multiplier=SIGMA["alpha"], clip_norm=1.0,
                                    sample_rate=RATE, steps=STEPS, delta=DELTA, epsilon_after=_epsilon("alpha", 1, "prv"),
                                    epsilon_rdp_after=_epsilon("alpha", 1, "rdp"), max_epsilon=20.0,
                                    status="committed", **fields))
        ledger.data.append(DataVersion("f", RECORDS, "", "first use", ledger.unit))
        ledger.save()
    assert main(["budget", str(tmp_path / "ward" / "ledger.json")]) == 0
    ward = capsys.readouterr().out
    assert f"units (patient_id) {RECORDS}" in ward
    assert "add/remove-one-unit neighbouring: each unit of 'patient_id' with ALL of its records (at most 3" in ward
    assert main(["budget", str(tmp_path / "clinic" / "ledger.json"), "--json"]) == 0
    clinic = json.loads(capsys.readouterr().out)
    assert clinic["unit"] == "record" and clinic["group_records"] == 5
    assert clinic["spent_epsilon_group"] == pytest.approx(epsilon_group(events, delta=DELTA, group=5))


def test_each_site_keeps_one_colour_across_every_figure(run, monkeypatch):
    """Issue 27 item 6: each figure cycled colours on its own, so a site changed colour between plots."""
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), kwargs.get("color")))
        return original(self, *args, **kwargs)

    view = json.loads((run / "privacy" / "ledger.json").read_text())
    view["clients"]["beta"][-1]["noise_multiplier"] = 2.0  # alpha and beta differ in every figure
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    monkeypatch.setattr(Axes, "plot", recording)
    build_report(run)
    by_site = {}
    for label, colour in drawn:
        if label in SIGMA:
            by_site.setdefault(label, set()).add(colour)
    assert set(by_site) == set(SIGMA) and all(len(c) == 1 and None not in c for c in by_site.values()), by_site
    assert by_site["alpha"] != by_site["beta"]


def test_a_deployments_report_describes_each_sites_own_file(run):
    """Issue 27 item 4: a deployment's report described the run config's packaged excerpt, split at random."""
    assert "each site's own file" not in build_report(run)[0]["run"]["data"]  # a simulation: the run config's file
    view = json.loads((run / "privacy" / "ledger.json").read_text())
    for records in view["clients"].values():
        for record in records:
            record["deployed"] = True
    (run / "privacy" / "ledger.json").write_text(json.dumps(view))
    doc, _ = build_report(run)
    data, partition = doc["run"]["data"], doc["run"]["partition"]
    assert data.startswith("each site's own file, which the coordinator never sees (alpha: 40 training records, "
                           "beta: 40 training records")
    assert "MedQuAD" not in data and "at random" not in partition and partition.startswith("none:")


@pytest.mark.parametrize("recorded, shown", [("ffa", "ffa"), ("fedavg", "fedavg"),
                                             ("auto", "auto (recorded as asked: ffa under DP, fedavg otherwise "
                                                      "when it ran)"), (None, None)])
def test_the_aggregation_is_the_one_the_run_recorded_never_re_derived(run, recorded, shown):
    """The server writes the aggregation it used; an older run's "auto" is shown as recorded, not re-read by today's rule."""
    config = json.loads((run / "config.json").read_text())
    config.pop("server.aggregation", None)
    if recorded is not None:
        config["server.aggregation"] = recorded
    (run / "config.json").write_text(json.dumps(config))
    write_report(run)
    assert json.loads((run / "report.json").read_text())["run"]["aggregation"] == shown
