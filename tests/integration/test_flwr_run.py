"""`flwr run .` (Flower's own CLI) against a real simulation SuperLink on 127.0.0.1."""

import json
import subprocess
from pathlib import Path

import pytest
from servers import BIN, free_port, running, tool_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_flwr_run_uses_the_app_config(tmp_path, model_cache):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = tool_env(home)
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port",
                 str(port), "--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"]
    overrides = ("model.name='tiny' model.max-length=48 data.max-train-examples=32 data.max-eval-examples=8 "
                 f"train.batch-size=4 train.local-steps=2 server.rounds=1 run.id='flwr' run.root='{tmp_path}'")
    with running(superlink, env, tmp_path / "superlink.log", port):
        proc = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "test", "--stream", "--run-config", overrides],
                              env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (tmp_path / "flwr" / "metrics.jsonl").is_file(), proc.stdout[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "flwr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert len(rows[1]["participants"]) == 2  # Flower's default simulated federation: 2 SuperNodes
    config = json.loads((tmp_path / "flwr" / "config.json").read_text())
    assert config["model.name"] == "tiny" and config["lora.r"] == 8  # override + pyproject default
