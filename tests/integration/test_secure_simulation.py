"""Secure aggregation through Flower's Simulation Engine: 4 tiny sites, one round, one dropout.

The secure mean of the three sites left must equal the clear FFA aggregate of their updates
(kept by tests/integration/secure_client.py) within the quantization bound, and the server's
files must hold no site's update.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.aggregate import aggregate
from server.secure_aggregation import error_bound

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


def fedslm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "fedslm", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("secure") / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = fedslm("simulate", "--scenario", "tiny", "--clients", "4", "--rounds", "1", "--out", str(out),
                  "--client-app", "secure_client:app", "--set", "server.secure-aggregation=true",
                  "--set", "data.max-train-examples=32", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_the_secure_sum_equals_the_clear_ffa_aggregate_despite_a_dropout(secure_run):
    out, stdout = secure_run
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert not row.get("skipped")
    assert [f["client"] for f in row["failed"]] == ["client-3"], row["failed"]
    assert "injected crash in client 3" in row["failed"][0]["reason"]
    assert row["secure_aggregation"]["in_sum"] == 3 and row["secure_aggregation"]["threshold"] == 3
    counts = {p["client"]: p["num-examples"] for p in row["participants"]}
    assert sorted(counts) == ["client-0", "client-1", "client-2"]
    clear = aggregate("ffa", [load_file(out / "clear-updates" / f"{name}-round-1.safetensors") for name in counts],
                      list(counts.values()))
    secure = load_file(out / "adapters" / "round-1" / "adapter_model.safetensors")
    bound = error_bound(4, list(counts.values()), row["secure_aggregation"]["max_weight"])
    error = max(float((secure[k].double() - clear[k].double()).abs().max()) for k in clear)
    assert error <= bound, (error, bound)
    assert max(float(v.abs().max()) for v in clear.values()) > 100 * bound, "the updates are too small to tell"
    assert "securely aggregated 3 updates" in stdout


def test_the_run_records_what_the_server_learned(secure_run):
    out, _ = secure_run
    report = json.loads((out / "report.json").read_text())
    assert "secure_aggregation" in report, sorted(report)
    assert any("sum" in item for item in report["secure_aggregation"]["server_learns"])
    assert report["secure_aggregation"]["rounds"][0]["in_sum"] == 3
    assert any(n["topic"] == "Secure aggregation" and n["text"].startswith("ON") for n in report["protection"])
    view = json.loads((out / "privacy" / "ledger.json").read_text())["clients"]
    assert sorted(view) == ["client-0", "client-1", "client-2"]  # privacy records still in clear


@pytest.mark.parametrize("aggregation", ["fedavg", "svd"])
def test_secure_aggregation_is_refused_for_fedavg_and_svd(aggregation):
    proc = fedslm("simulate", "--scenario", "tiny", "--set", "server.secure-aggregation=true",
                  "--set", f"server.aggregation={aggregation}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.secure-aggregation needs server.aggregation ffa" in lines[0], proc.stderr
