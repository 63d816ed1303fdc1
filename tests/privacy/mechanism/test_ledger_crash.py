"""The ledger survives kill -9 of a training process at any moment."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy.mechanism.accountant import epsilon
from privacy.mechanism.ledger import SPENDING, Ledger

WORKER = Path(__file__).with_name("ledger_worker.py")
ROOT = Path(__file__).resolve().parents[3]
TRAINED_STEPS = 20  # ledger_worker.py trains (and must reserve) this many steps per round


def started(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def check(ledger_dir: Path, marker: Path) -> Ledger:
    ledger = Ledger.load(next(ledger_dir.glob("ledger.json")))  # parses: never torn
    keys = {f"{e.run_id}:{e.round}" for e in ledger.entries}
    assert set(started(marker)) <= keys, "a training started without its spend on disk"
    assert all(e.status in SPENDING for e in ledger.entries)
    assert {e.steps for e in ledger.entries} == {TRAINED_STEPS}, "the spend on disk is not what was trained"
    assert ledger.spent() == pytest.approx(epsilon([e.event() for e in ledger.entries], delta=ledger.delta))
    return ledger


@pytest.mark.integration
def test_kill_minus_nine_never_corrupts_and_counts_reserved_spend(tmp_path):
    marker, ledger_dir = tmp_path / "started.txt", tmp_path / "ledgers"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # After "ready": a kill right after a training starts (guaranteed mid-training), then
    # kills at fixed delays that land anywhere: inside a reserve or commit write, in
    # training, between rounds.
    for kill_at in ("training", 0.05, "training", 0.3, 0.8, "training", 1.3, 2.1):
        proc = subprocess.Popen([sys.executable, str(WORKER), str(ledger_dir), str(marker)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
        if kill_at == "training":
            before = len(started(marker))
            deadline = time.time() + 60
            while len(started(marker)) == before and time.time() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(kill_at)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if any(ledger_dir.glob("ledger.json")):
            check(ledger_dir, marker)
    final = check(ledger_dir, marker)
    reserved = [e for e in final.entries if e.status == "reserved"]
    assert len(reserved) >= 3, "the mid-training kills must leave reserved entries"
    committed_only = epsilon([e.event() for e in final.entries if e.status == "committed"], delta=final.delta)
    assert final.spent() > committed_only  # reserved spend counts
