"""Rounds beyond what a budget of eps=1 allows: clients refuse, the run stops cleanly, no ledger exceeds 1."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def simulate(out, ledgers):
    return subprocess.run(
        [sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--rounds", "2", "--out", str(out),
         "--set", f"dp.ledger-dir={ledgers}", "--set", "dp.max-epsilon=1", "--set", "dp.target-epsilon=1"],
        capture_output=True, text=True, timeout=600)


def test_second_run_on_the_same_data_continues_the_spend_and_refuses(tmp_path, model_cache):
    ledgers = tmp_path / "client-ledgers"
    first = simulate(tmp_path / "first", ledgers)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = simulate(tmp_path / "second", ledgers)
    assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]  # ran, trained 0 of 2 rounds
    assert second.stdout.rstrip().splitlines()[-1].startswith("[fedslm] done: 0 of 2 rounds trained")
    assert second.stdout.rstrip().endswith("; exit code 3")
    assert "refused: budget exhausted" in second.stdout
    assert "clients still have budget (min-clients 1); stopping cleanly" in second.stdout

    files = sorted(ledgers.glob("*/ledger.json"))
    assert [f.parent.name for f in files] == ["client-0", "client-1"]  # one ledger per client, shared by both runs
    for path in files:
        entries = json.loads(path.read_text())["entries"]
        assert [(e["run_id"], e["status"]) for e in entries] == [
            ("first", "committed"), ("first", "committed"), ("second", "refused")]
        assert all(e["epsilon_after"] <= 1.0 and e["epsilon_rdp_after"] > 0 for e in entries)
        assert entries[1]["epsilon_after"] > 0.9  # the first run used its budget

    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]  # round 0 eval kept, round 1 recorded as skipped
    assert rows[1]["skipped"] and {r["client"] for r in rows[1]["refused"]} == {"client-0", "client-1"}
    view = json.loads((tmp_path / "second" / "privacy" / "ledger.json").read_text())
    assert view["exhausted"] == ["client-0", "client-1"]

    budget = subprocess.run([sys.executable, "-m", "fedslm", "budget", str(files[0]), "--json"],
                            capture_output=True, text=True, timeout=120)
    doc = json.loads(budget.stdout)
    assert doc["spent_epsilon"] <= 1.0 and doc["remaining_epsilon"] == pytest.approx(1.0 - doc["spent_epsilon"])
    assert [e["status"] for e in doc["entries"]] == ["committed", "committed", "refused"]
