"""A deployment's node config wins over the coordinator's run config where the site's privacy is at stake."""

from types import SimpleNamespace

import pytest

from client.app import ledger_directory, local_config, site_name
from slm.errors import UserError

COORDINATOR = {"dp.enabled": False, "dp.noise-seed": 7, "dp.max-epsilon": 100.0, "model.name": "tiny"}


def context(node_config: dict):
    return SimpleNamespace(run_config=COORDINATOR, node_config=node_config)


def test_a_site_keeps_dp_on_with_os_entropy_and_its_own_budget(tmp_path):
    site = context({"data-path": str(tmp_path / "r.jsonl"), "ledger-dir": str(tmp_path / "l"), "max-epsilon": 3.0})
    config = local_config(site)
    assert config["dp.enabled"] is True and config["dp.noise-seed"] == -1 and config["dp.max-epsilon"] == 3.0


def test_a_simulated_client_follows_the_run_config():
    config = local_config(context({"partition-id": 0, "num-partitions": 2}))
    assert config["dp.enabled"] is False and config["dp.noise-seed"] == 7


def test_a_sites_ledger_does_not_depend_on_its_name(tmp_path):
    site = context({"data-path": "x", "ledger-dir": str(tmp_path)})
    config = local_config(site)
    assert ledger_directory(config, {}, "renamed", site) == ledger_directory(config, {}, "hospital-a", site) == tmp_path
    simulated = context({"partition-id": 1})
    assert ledger_directory(local_config(simulated), {"run-dir": "r"}, "client-1", simulated).parts[-2:] == (
        "ledgers", "client-1")


def test_a_deployment_without_a_ledger_dir_is_refused():
    site = context({"data-path": "x"})
    with pytest.raises(UserError, match="'ledger-dir' is required in a deployment"):
        ledger_directory(local_config(site), {}, "a", site)


@pytest.mark.parametrize("name", ["", "../up", ".hidden", "a/b", "x" * 65, 3])
def test_a_site_name_must_be_a_plain_directory_name(name):
    with pytest.raises(UserError, match="node config key 'name'"):
        site_name(name)
