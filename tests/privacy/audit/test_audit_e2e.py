"""The audit end to end on the tiny model, with the client's own DP-SGD code.

Without noise the canaries must leak (else the audit could catch nothing); with DP the
lower bound must stay at or below the reported epsilon; and a mechanism that claims
eps = 1 but adds no noise must be caught. Small and fast settings: 32 canaries of 3
digits, 120 steps at lr 0.1 (q = 1/4 on the 16 inserted canaries), measured to separate
members from non-members completely without noise.
"""

import json

import pytest

from client.train import train_adapter
from fedslm.cli.main import main
from privacy.audit.doc import SCHEMA, audit_sentences
from privacy.audit.run import AuditSpec, run_audit
from privacy.report.build import write_report
from slm.lora import adapter_state
from slm.tasks import Task

TASK = Task(kind="sft", max_length=128)
FAST = {"canaries": 32, "digits": 3, "steps": 120, "lr": 0.1, "batch_size": 4, "candidates": 31,
        "exposure_canaries": 4}


def no_noise(*args, noise_multiplier, **kwargs):
    """A broken client: clips but forgets the noise, while the accountant is told the calibrated sigma."""
    return train_adapter(*args, noise_multiplier=0.0, **kwargs)


def test_sigma0_leaks_and_dp_stays_below_its_reported_epsilon(tiny):
    model, tokenizer = tiny
    before = adapter_state(model)
    lines = []
    doc = run_audit(model, tokenizer, TASK, AuditSpec(**FAST, epsilons=(1.0,)), train=train_adapter,
                    freeze_a=True, log=lines.append)
    json.dumps(doc, allow_nan=False)  # strict JSON: no inf / nan anywhere
    assert doc["schema"] == SCHEMA and doc["canaries"]["count"] == 32
    assert doc["canaries"]["inserted"] == sum(doc["canaries"]["included"]) == doc["training"]["records"]
    assert doc["training"]["sample_rate"] == pytest.approx(4 / doc["training"]["records"])
    baseline, dp = doc["trials"]
    assert baseline["noise_multiplier"] == 0.0 and baseline["epsilon"] is None
    assert baseline["verdict"] == "leaks" and baseline["bound"]["epsilon_lower"] > 1.0
    assert baseline["membership"]["inserted"]["mean"] > baseline["membership"]["not_inserted"]["mean"]
    exp = baseline["exposure"]
    assert exp["inserted"]["sampled"]["mean"] > exp["not_inserted"]["sampled"]["mean"]
    assert exp["inserted"]["sampled"]["count"] == exp["not_inserted"]["sampled"]["count"] == 4
    assert dp["noise_multiplier"] > 1 and 0.95 < dp["epsilon"] <= 1.0 + 1e-9 and dp["epsilon_rdp"] >= dp["epsilon"]
    assert dp["bound"]["epsilon_lower"] <= dp["epsilon"] and dp["verdict"] == "consistent"
    assert doc["canaries"]["loss_initial"]["count"] == 32
    after = adapter_state(model)
    assert all((after[k] == before[k]).all() for k in before)  # the audit leaves the model as it found it
    assert len(lines) == 4 and len(audit_sentences(doc)) == 4


def test_a_mechanism_without_its_noise_is_caught(tiny):
    model, tokenizer = tiny
    doc = run_audit(model, tokenizer, TASK, AuditSpec(**{**FAST, "exposure_canaries": 0}, epsilons=(1.0,),
                                                      baseline=False),
                    train=no_noise, freeze_a=True, log=lambda _: None)
    (trial,) = doc["trials"]
    assert trial["epsilon"] == pytest.approx(1.0, abs=0.05)  # what the accountant was told
    assert trial["bound"]["epsilon_lower"] > trial["epsilon"] and trial["verdict"] == "violation"
    assert trial["exposure"] is None


def test_cli_writes_the_audit_into_a_run_and_the_report_shows_it(tmp_path, model_cache, capsys):
    from test_report import _write_run

    run = _write_run(tmp_path / "run")
    code = main(["audit", "--model", "tiny", "--run", str(run), "--canaries", "24", "--digits", "3", "--steps", "10",
                 "--batch-size", "4",
                 "--epsilon", "2", "--exposure-canaries", "2", "--candidates", "7", "--set", "model.max-length=128"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Empirical audit: 24 canaries" in out and "privacy report with the audit" in out
    audit = json.loads((run / "audit.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert report["audit"] == audit and [t["target_epsilon"] for t in audit["trials"]] == [None, 2.0]
    assert report["summary"]["audit"].startswith("An empirical audit with canaries")
    page = (run / "report.html").read_text()
    assert "Empirical audit" in page and "eps lower bound (95%)" in page and "not the true epsilon" in page
    assert "No empirical audit was run" not in page
    (run / "audit.json").write_text('{"schema": "something-else/1"}')
    with pytest.raises(Exception, match="not a fedslm audit"):
        write_report(run)


def test_the_audits_canaries_take_the_runs_window_and_the_cap_when_it_is_fitted():
    """`fedslm audit` as docs/AUDIT.md shows it, without --set model.max-length: 0 (fitted to data the audit never
    reads) is the cap, as at a deployed site, never a window of 0 tokens that no canary fits."""
    from fedslm.cli.audit import audit_task
    from fedslm.common.config import resolve
    from fedslm.common.vocabulary import RunConfig

    assert audit_task(RunConfig.parse(resolve())).max_length == 128
    fixed = audit_task(RunConfig.parse(resolve({"model.max-length": 96, "data.prompt-field": "q"})))
    assert fixed.max_length == 96 and fixed.prompt_field == "q" and fixed.kind == "sft"
