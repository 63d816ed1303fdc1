"""Server-side user-level DP in a real simulation: Poisson cohorts, noise, per-round accounting, and a kill
between a round's noise draw and its release."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration
NAMES = [f"client-{i}" for i in range(6)]
# Poisson cohorts from fresh OS entropy: a round samples nobody with probability (1 - q)^6, and then (truthfully)
# trains nothing and the run exits 3. At q = 0.5 that is 1/64 per round (it happened once); at 0.75, 1/4096.
SAMPLE_RATE = 0.75


def command(out, rounds=3):
    return [sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--clients", "6", "--rounds",
            str(rounds), "--out", str(out), "--set", "user-dp.enabled=true",
            "--set", f"server.fraction-train={SAMPLE_RATE}", "--set", "user-dp.clip-norm=0.5", "--set", "data.max-train-examples=32", "--set", "train.local-steps=2"]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_user_level_dp_is_applied_and_accounted_every_round(tmp_path, model_cache):
    out = tmp_path / "udp"
    proc = subprocess.run(command(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(out)[1:]
    records = [r["user_dp"] for r in rows]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["sampling"] == "poisson" and r["sample_rate"] == SAMPLE_RATE and r["eligible"] == 6 for r in records)
    assert [r["cohort"] for r in records] == [r["cohort"] for r in rows]
    eps = [r["epsilon"] for r in records]
    assert 0 < eps[0] < eps[1] < eps[2]
    view = json.loads((out / "privacy" / "ledger.json").read_text())
    assert view["user_level"] == records  # next to the clients' sample-level records
    assert set(view["clients"]) <= set(NAMES)
    # who trained is what the amplification hides: neither metrics.jsonl nor the console names the cohort
    for row in rows:
        assert "participants" not in row and "train_loss" not in row
        training = json.dumps({k: v for k, v in row.items() if k != "eval_clients"})  # eval: every client
        assert not [n for n in NAMES if n in training]
    training_lines = [line for line in proc.stdout.splitlines()
                      if line.startswith("[fedslm] round ") and "eval loss" not in line]
    assert len(training_lines) >= 3 and not [line for line in training_lines for n in NAMES if n in line]
    # the simulated sites keep quiet: no progress line names a site that trained (client.progress)
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() for n in NAMES if f"[fedslm] {n}:" in line]


def pending(out):
    """The checkpoint a round's noise draw leaves before its release: one user-level event more than rounds."""
    from server import checkpoint

    try:
        state = checkpoint.load(out)
    except Exception:
        return None
    return state if len(state.user_dp_events) > state.round else None


def test_a_run_killed_between_noise_and_release_counts_both_draws(tmp_path, model_cache):
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    caught = None
    try:
        deadline = time.time() + 500
        while caught is None and time.time() < deadline and proc.poll() is None:
            caught = pending(out)
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its simulation workers, by PID
        proc.wait()
    assert caught is not None, "never saw the checkpoint between a noise draw and its release"
    interrupted = caught.round + 1

    resumed = subprocess.run([sys.executable, "-m", "fedslm", "simulate", "--resume", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"round {interrupted} was interrupted after its user-level noise was drawn" in resumed.stdout

    from privacy.report.reconcile import account_user_level
    from server import checkpoint

    rows = metrics(out)
    assert [r["round"] for r in rows if "shipped" not in r] == sorted([0, 1, 2, 3, interrupted])
    assert [r["round"] for r in rows if r.get("interrupted")] == [interrupted]
    assert len(checkpoint.load(out).user_dp_events) == 4  # three rounds, the interrupted draw counted too
    account = account_user_level(rows)  # what the privacy report recomputes from metrics.jsonl
    assert [r["round"] for r in account.rounds] == sorted([1, 2, 3, interrupted]) and not account.disagreements
    assert account.epsilon == pytest.approx(rows[-1]["user_dp"]["epsilon"])


def test_user_dp_with_svd_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--set",
                           "user-dp.enabled=true", "--set", "server.aggregation=svd"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "user-dp.enabled needs server.aggregation fedavg or ffa" in proc.stderr
