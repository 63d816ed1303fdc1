"""Server-side user-level DP in a real simulation: Poisson cohorts, noise, per-round accounting."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_user_level_dp_is_applied_and_accounted_every_round(tmp_path, model_cache):
    out = tmp_path / "udp"
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "simulate", "--scenario", "tiny", "--clients", "6", "--rounds", "3",
         "--out", str(out), "--set", "user-dp.enabled=true", "--set", "server.fraction-train=0.5",
         "--set", "user-dp.clip-norm=0.5", "--set", "data.max-train-examples=32", "--set", "train.local-steps=2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    records = [r["user_dp"] for r in rows]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["sampling"] == "poisson" and r["sample_rate"] == 0.5 and r["eligible"] == 6 for r in records)
    assert [r["cohort"] for r in records] == [len(r["participants"]) for r in rows]
    eps = [r["epsilon"] for r in records]
    assert 0 < eps[0] < eps[1] < eps[2]
    view = json.loads((out / "privacy" / "ledger.json").read_text())
    assert view["user_level"] == records  # next to the clients' sample-level records
    assert set(view["clients"]) <= {f"client-{i}" for i in range(6)}


def test_user_dp_with_svd_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulation.cli", "simulate", "--scenario", "tiny", "--set",
                           "user-dp.enabled=true", "--set", "server.aggregation=svd"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "user-dp.enabled needs server.aggregation fedavg or ffa" in proc.stderr
