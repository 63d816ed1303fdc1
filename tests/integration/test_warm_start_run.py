"""A federation that starts from a warm start: `fedslm warm-start` on a public file, then `fedslm simulate` with
server.initial-adapter, through Flower's Simulation Engine (tiny model)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "fedslm"]


def test_a_run_starts_from_the_warm_adapter_and_its_report_says_so(tmp_path, model_cache):
    from safetensors.torch import load_file

    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"question": f"What is condition {i}?",
                                          "answer": f"Condition {i} is a rare disorder of the heart."}) + "\n"
                              for i in range(40)))
    start = tmp_path / "start"
    warm = subprocess.run([*CLI, "warm-start", str(public), "--out", str(start), "--scenario", "tiny", "--steps", "20",
                           "--lr", "1e-2"], capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
    assert f"start a run from it: --set server.initial-adapter={start}" in warm.stdout
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "simulate", "--scenario", "tiny", "--rounds", "1", "--out", str(out), "--set",
                           f"server.initial-adapter={start}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fedslm] starting adapter: read from" in proc.stdout and "public file public.jsonl" in proc.stdout
    warm_state = load_file(str(start / "adapter_model.safetensors"))
    round0 = load_file(str(out / "adapters" / "round-0" / "adapter_model.safetensors"))
    assert round0.keys() == warm_state.keys() and all(torch.equal(round0[k], warm_state[k]) for k in round0)
    record = json.loads((out / "initial_adapter.json").read_text())
    assert record["warm_start"]["file"] == "public.jsonl" and record["directory"] == str(start)
    report = json.loads((out / "report.json").read_text())
    note = next(n["text"] for n in report["protection"] if n["topic"] == "Starting adapter")
    assert "public file public.jsonl" in note and "cannot check that the file is public" in note
    assert report["run"]["started_from_public_data"] is True


def test_a_missing_starting_adapter_is_one_line_before_anything_trains(tmp_path, model_cache):
    proc = subprocess.run([*CLI, "simulate", "--scenario", "tiny", "--rounds", "1", "--out", str(tmp_path / "run"),
                           "--set", f"server.initial-adapter={tmp_path / 'nowhere'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "server.initial-adapter': " in proc.stderr and "holds no adapter_model.safetensors" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
