"""deploy.node_config: a site's node config must pin its own records, ledger and budget, with no typo."""

import subprocess

import pytest
from harness import DEPLOY, script_env, write_node_config

from deploy.node_config import check
from fedslm.common.errors import UserError


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    return path


def test_a_complete_config_passes(tmp_path, records):
    config = write_node_config(tmp_path / "node.toml", data_path=str(records), ledger_dir=str(tmp_path / "l"),
                               max_epsilon=8, delta=1e-6, model_dir="tiny", name="st-mary.oncology")
    assert check(config)["max-epsilon"] == 8


@pytest.mark.parametrize("values, message", [
    ({"max_epsilon": 8.0}, "'ledger-dir' is required in a deployment"),
    ({"ledger_dir": "{tmp}/l"}, "'max-epsilon' is required in a deployment"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "name": None}, "'name' is required in a deployment"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "max_epsilon_typo": 1}, "unknown key 'max-epsilon-typo'"),
    ({"ledger_dir": "ledger", "max_epsilon": 8.0}, "'ledger-dir' must be an absolute path"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": "eight"}, "'max-epsilon' must be a number, got 'eight'"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 0}, "'max-epsilon' must be a positive number"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "delta": 0.2}, "'delta' must be in \\(0, 0.001\\]"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "name": "../a"}, "node config key 'name': '../a' is not a site name"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "model_dir": None}, "'model-dir' is required in a deployment"),
    ({"ledger_dir": "{tmp}/l", "max_epsilon": 8.0, "evaluate": True}, "'evaluate' = true no longer exists"),
])
def test_what_would_leave_privacy_to_the_server_is_refused(tmp_path, records, values, message):
    values = {"name": "site-a", "model_dir": "tiny",
              **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}}
    config = write_node_config(tmp_path / "node.toml", data_path=str(records),
                               **{k: v for k, v in values.items() if v is not None})
    with pytest.raises(UserError, match=message):
        check(config)


def test_supernode_script_refuses_before_starting_flower(tmp_path, records):
    config = write_node_config(tmp_path / "node.toml", data_path=str(records), max_epsilon=8.0, name="site-a")
    (tmp_path / "ca.crt").write_text("unused")
    (tmp_path / "node.key").write_text("unused")
    env = script_env(tmp_path / "home", FEDSLM_SUPERLINK="127.0.0.1:1", FEDSLM_CA=str(tmp_path / "ca.crt"),
                     FEDSLM_KEY=str(tmp_path / "node.key"), FEDSLM_NODE_CONFIG=str(config))
    proc = subprocess.run([str(DEPLOY / "supernode.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"deploy.node_config: error: node config {config}: 'ledger-dir' is required in a deployment "
        "(where the site's privacy ledger persists across runs)"]
