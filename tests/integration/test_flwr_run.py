"""Flower's own `flwr run .` simulation, as a user types it through `fedslm flwr-run` (issue 27 item 3).

A plain `flwr run .` let Flower's managed SuperLink install the app's dependencies (5.7 GB of
CUDA packages) and left that SuperLink running, detached, after it returned. Here the command
runs a real 1-round federation of the tiny model through Flower's SuperLink and must: train,
install nothing, leave no process behind, and print no colour codes into a redirected log.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ("model.name='tiny' model.max-length=48 server.rounds=1 train.local-steps=2 data.max-train-examples=32 "
         "data.max-eval-examples=4 ship.quantizations=''")


def flwr_run(supernodes: int, run_config: str):
    """`fedslm flwr-run` as a user types it."""
    return subprocess.run([sys.executable, "-m", "fedslm", "flwr-run", "--supernodes", str(supernodes),
                           "--run-config", f"{SMALL} {run_config}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=480, check=False)


def test_flwr_run_trains_installs_nothing_and_leaves_no_superlink(tmp_path):
    done = flwr_run(2, f"server.min-clients=2 run.root='{tmp_path}' run.id='flwr-run'")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "flwr-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and len(rows[1]["participants"]) == 2
    assert "dependency installation off" in out and not re.search(r"uv (sync|pip)|Installing collected", out)
    assert "\x1b[" not in out
    home = re.search(r"FLWR_HOME (\S+),", out).group(1)
    assert "stopped the SuperLink it started" in out and not Path(home).exists()
    left = [p for p in psutil.process_iter(["cmdline"]) if any(home in part for part in p.info["cmdline"] or [])]
    assert left == []


def test_flwr_run_exits_3_when_no_round_trained(tmp_path):
    """flwr run itself exits 0 whatever the ServerApp did; a run where every site refused (budget) must not."""
    done = flwr_run(1, f"server.min-clients=1 run.root='{tmp_path}' run.id='refused' dp.max-epsilon=0.01 "
                       "dp.target-epsilon=0.01")
    assert done.returncode == 3, (done.stdout + done.stderr)[-3000:]
    assert "done: 0 of 1 rounds trained" in done.stdout
    # Flower records the run as failed; its crash report is one line (server/status.py), not a traceback.
    assert "[fedslm] run status: failed, 0 of 1 rounds trained" in done.stdout
    assert "Traceback" not in done.stdout and "Exit Code" not in done.stdout
