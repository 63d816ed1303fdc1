"""Fault injection: NaN, wrong shapes and a crashing client, and a server killed after round 2.

The resumed run must end with exactly the adapter of an uninterrupted run with the same
seeds: client noise seeds are fixed (dp.noise-seed) and the requested sigma dominates the
calibration, so a round that was started before the kill and repeated after it (its
spend reserved twice in the ledger, conservatively) trains identically.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent
SETTINGS = ["--set", "data.partition=iid", "--set", "server.min-clients=1", "--set", "dp.noise-seed=7",
            "--set", "dp.noise-multiplier=1.0", "--set", "dp.target-epsilon=50", "--set", "dp.max-epsilon=50",
            "--set", "train.local-steps=2"]


def command(out):
    return [sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--clients", "4", "--rounds",
            "4", "--out", str(out), "--client-app", "faulty_client:app", *SETTINGS]


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_round(run) -> int:
    from server import checkpoint

    try:
        return checkpoint.load(run).round
    except Exception:
        return -1


def test_bad_clients_are_rejected_and_a_killed_server_resumes_exactly(tmp_path):
    straight = tmp_path / "straight" / "run"
    done = subprocess.run(command(straight), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for row in rows(straight)[1:]:
        assert [p["client"] for p in row["participants"]] == ["client-0"]
        reasons = {r["client"]: r["reason"] for r in row["rejected"]}
        assert "non-finite" in reasons["client-1"] and "shape" in reasons["client-2"]
        assert row["failed"] and "injected crash in client 3" in row["failed"][0]["reason"]

    killed = tmp_path / "killed" / "run"
    proc = subprocess.Popen(command(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while checkpoint_round(killed) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint_round(killed) == 2, "the run never reached round 2"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its simulation workers, by PID
        proc.wait()
    resumed = subprocess.run([sys.executable, "-m", "fedslm", "simulate", "--resume", str(killed)],
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 2" in resumed.stdout

    assert [r["round"] for r in rows(killed)] == [0, 1, 2, 3, 4]  # nothing lost, nothing repeated
    events = [json.loads(line)["event"] for line in (killed / "events.jsonl").read_text().splitlines()]
    assert events == ["resumed", "finished"]
    a = load_file(straight / "adapters" / "round-4" / "adapter_model.safetensors")
    b = load_file(killed / "adapters" / "round-4" / "adapter_model.safetensors")
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
