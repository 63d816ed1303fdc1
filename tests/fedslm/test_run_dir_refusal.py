"""`fedslm simulate` never writes into a directory that holds anything: one line, exit 2, in milliseconds.

The refusal comes before anything heavy is imported (torch, transformers, Flower, Ray) and
before any file is written, so the earlier run's files stay byte-identical.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedslm.cli.simulate import refuse_used

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "flwr", "ray", "peft", "opacus")
# main() as the console script runs it, then which heavy modules it imported
PROGRAM = ("import sys\nfrom fedslm.cli.main import main\nrc = main(sys.argv[1:])\n"
           f"print('heavy:', [m for m in {HEAVY!r} if m in sys.modules])\nsys.exit(rc)\n")


def finished_run(path: Path) -> None:
    (path / "ledgers" / "client-0").mkdir(parents=True)
    (path / "ledgers" / "client-0" / "ledger.json").write_text('{"entries": []}')
    (path / "config.json").write_text(json.dumps({"run.id": path.name}))
    (path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    (path / "events.jsonl").write_text('{"event": "finished"}\n')
    (path / "simulation.json").write_text('{"clients": 2}')


def snapshot(path: Path) -> dict:
    if path.is_file():
        return {path: path.read_bytes()}
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def simulate(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, "simulate", "--scenario", "tiny", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("contents, words", [
    (finished_run, ["already holds a run (config.json, metrics.jsonl, events.jsonl, ledgers, simulation.json)",
                    "choose a new --out", "`fedslm simulate --resume {out}`"]),
    (lambda p: (p / "metrics.jsonl").write_text('{"round": 0}\n'), ["already holds a run (metrics.jsonl)"]),
    (lambda p: (p / "notes.txt").write_text("mine"), ["is not empty and holds no fedslm run", "choose a new --out"]),
])
def test_a_used_out_directory_is_refused_fast_and_left_as_it_was(tmp_path, contents, words):
    out = tmp_path / "run"
    out.mkdir()
    contents(out)
    before = snapshot(tmp_path)
    proc, seconds = simulate("--rounds", "2", "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedslm: error: --out {out} ")
    for word in words:
        assert word.format(out=out) in lines[0]
    assert proc.stdout.strip() == "heavy: []"  # no model, no Flower, no Ray: nothing started
    assert seconds < 10, f"the refusal took {seconds:.1f}s"  # about 0.1 s; generous for a shared machine
    assert snapshot(tmp_path) == before


def test_a_file_and_a_used_run_id_are_refused_too(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc, _ = simulate("--out", str(tmp_path / "afile"))
    assert proc.returncode == 2 and f"--out {tmp_path / 'afile'} is a file" in proc.stderr
    finished_run(tmp_path / "old")
    proc, _ = simulate("--set", f"run.root={tmp_path}", "--set", "run.id=old")
    assert proc.returncode == 2 and f"run directory {tmp_path / 'old'} already holds a run" in proc.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_a_new_or_empty_directory_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse_used(tmp_path / "empty", "--out")
    refuse_used(tmp_path / "new" / "run", "--out")
    assert not (tmp_path / "new").exists()
