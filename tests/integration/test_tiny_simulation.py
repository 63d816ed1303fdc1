"""A real 2-client, 2-round federation through Flower's Simulation Engine (Ray), tiny model."""

import json
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def simulate(out):
    return [sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--rounds", "2", "--clients", "2",
            "--out", str(out)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("runs") / "tiny-run"
    proc = subprocess.run(simulate(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_metrics_have_round_zero_and_two_rounds(tiny_run):
    out, stdout = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert len(row["participants"]) == 2 and not row["failed"] and not row.get("skipped")
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert all(set(r["eval_clients"]) == {"client-0", "client-1"} for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert f"run directory: {out}" in stdout and "round 2: client-1 trained on" in stdout
    assert "done: 2 of 2 rounds trained" in stdout


def test_sites_print_their_progress(tiny_run):
    """Training steps and evaluated records, printed by the simulated ClientApps (forwarded by Ray)."""
    _, output = tiny_run
    assert re.search(r"\[fedslm\] client-[01]: step (\d+)/\1", output)
    assert re.search(r"\[fedslm\] client-[01]: evaluated (\d+)/\1 records", output)


def test_config_is_recorded(tiny_run):
    out, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert config["model.name"] == "tiny" and config["server.rounds"] == 2 and config["run.scenario"] == "tiny"
    assert config["server.aggregation"] == "ffa"  # what the server used ("auto" asked, DP on), never re-derived


def test_every_round_adapter_loads_with_peft(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slm.base import resolve_model_dir

    out, _ = tiny_run
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    logits = []
    for k in (0, 1, 2):
        base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"))
        model = PeftModel.from_pretrained(base, out / "adapters" / f"round-{k}").eval()
        logits.append(model(input_ids=ids).logits)
    assert not torch.allclose(logits[0], logits[2]), "training did not change the global adapter"


def test_client_ledgers_and_server_view_agree(tiny_run):
    out, _ = tiny_run
    ledgers = sorted((out / "ledgers").glob("*/ledger.json"))
    assert [p.parent.name for p in ledgers] == ["client-0", "client-1"]
    view = json.loads((out / "privacy" / "ledger.json").read_text())["clients"]
    for path in ledgers:
        entries = json.loads(path.read_text())["entries"]
        assert [e["status"] for e in entries] == ["committed", "committed"]
        eps = [e["epsilon_after"] for e in entries]
        assert 0 < eps[0] < eps[1] <= 8.0  # target 8 over the 2 planned rounds
        reported = [r["epsilon"] for r in view[path.parent.name]]
        assert reported == eps
        assert all(r["sampling"] == "poisson" and r["accountant"] == "prv" for r in view[path.parent.name])


def test_the_same_command_again_is_refused_and_changes_nothing(tiny_run):
    """A run directory is written by one run: a second run on it would append a second round 0."""
    out, _ = tiny_run
    before = {p: p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    proc = subprocess.run(simulate(out), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--out {out} already holds a run" in proc.stderr and f"fedslm simulate --resume {out}" in proc.stderr
    assert {p: p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))} == before
