"""The site's policy comes from its node config; the coordinator's run config cannot move it."""

from types import SimpleNamespace

import pytest

from client.app import admitted
from client.data import DataSpec, held_out_by_hash, split
from client.request import parse_evaluation
from client.site import SitePolicy, site_name
from fedslm.common.errors import UserError

COORDINATOR = {"dp.enabled": False, "dp.noise-seed": 7, "dp.max-epsilon": 100.0, "dp.delta": 0.2,
               "dp.ledger-dir": "/tmp/elsewhere", "data.seed": 3, "data.test-fraction": 0.5,
               "data.max-train-examples": 2, "model.name": "tiny"}


def site_config(tmp_path, **extra) -> dict:
    data = tmp_path / "records.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(40)))
    return {"name": "site-a", "data-path": str(data), "ledger-dir": str(tmp_path / "ledger"), "max-epsilon": 3.0,
            "model-dir": "tiny", "fields": "question,answer", **extra}


def site_and_data(context, run_dir: str = "") -> tuple:
    """(the request's specs, the site's policy, its records), as the ClientApp admits an evaluation request."""
    policy, request, local = admitted(context, {"run-id": "run-1", "server-round": 1, "aggregation": "ffa",
                                                "run-dir": run_dir}, parse_evaluation)
    return request.specs, policy, local


def test_a_site_keeps_dp_on_with_os_entropy_its_budget_delta_ledger_and_split(tmp_path, capsys):
    context = SimpleNamespace(run_config=COORDINATOR, node_config=site_config(tmp_path))
    _, policy, local = site_and_data(context)
    assert policy.dp_enabled and policy.noise_seed == -1 and policy.max_epsilon == 3.0 and policy.delta == 0.0
    assert policy.ledger_dir == tmp_path / "ledger" and local.name == "site-a"
    baseline = SimpleNamespace(run_config={"model.name": "tiny"}, node_config=site_config(tmp_path))
    assert site_and_data(baseline)[2] == local  # the coordinator's data.* keys changed nothing
    log = capsys.readouterr().err
    for key in ("dp.delta=0.2", "dp.max-epsilon=100.0", "data.seed=3", "data.test-fraction=0.5", "dp.enabled=False"):
        assert f"ignored the coordinator's {key}" in log


def test_a_simulated_client_follows_the_run_config(tmp_path):
    from simulation.scenarios import DEMO_DATA

    config = {**COORDINATOR, "dp.delta": 1e-6, "data.path": str(DEMO_DATA)}  # a simulation names its file
    context = SimpleNamespace(run_config=config, node_config={"partition-id": 1, "num-partitions": 2})
    _, policy, local = site_and_data(context, run_dir=str(tmp_path))
    assert policy.dp_enabled is False and policy.noise_seed == 7 and local.name == "client-1"
    assert policy.ledger_dir.parts[-2:] == ("elsewhere", "client-1")


def test_the_record_hash_split_is_stable_under_appends_and_reordering():
    spec = DataSpec(path="x", task="sft", prompt_field="q", response_field="a", text_field="t", label_field="l",
                    verbalizers="", partition="iid", partition_by="", dirichlet_alpha=0.0, test_fraction=0.2,
                    max_train=0, max_eval=0, seed=0, split="record-hash")
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(200)]
    first = split(rows, spec, "s")
    grown = split([{"q": "new", "a": "new"}, *rows[::-1]], spec, "s")
    assert {r["q"] for r in first.test} <= {r["q"] for r in grown.test}
    assert {r["q"] for r in first.train} <= {r["q"] for r in grown.train}
    assert 20 <= len(first.test) <= 60  # about 20% of 200
    assert all(held_out_by_hash(r, 0.2) for r in first.test)


def test_pinned_held_out_records_come_from_their_own_file(tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text('{"question": "held", "answer": "out"}\n')
    context = SimpleNamespace(run_config={"model.name": "tiny"},
                              node_config=site_config(tmp_path, **{"test-data-path": str(held)}))
    _, _, local = site_and_data(context)
    assert len(local.train) == 40 and local.test == [{"question": "held", "answer": "out"}]


def test_a_coordinator_cannot_point_a_site_at_another_file(tmp_path):
    """data.path and data.eval-path are requests a deployed site ignores: it reads its own files only."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(f'{{"question": "other {i}", "answer": "x"}}\n' for i in range(30)))
    context = SimpleNamespace(run_config={"model.name": "tiny", "data.path": str(other), "data.eval-path": str(other)},
                              node_config=site_config(tmp_path))
    _, policy, local = site_and_data(context)
    seen = [r["question"] for r in local.train + local.test]
    assert seen and not any(q.startswith("other") for q in seen)
    assert {item.split("=")[0] for item in policy.ignored_requests(context.run_config)} == {"data.path", "data.eval-path"}


@pytest.mark.parametrize("extra, message", [
    ({"name": None}, "'name' is required in a deployment"),
    ({"ledger-dir": None}, "'ledger-dir' is required"),
    ({"delta": 0.2}, "'delta' must be in"),
    ({"max-epsilon": -1.0}, "'max-epsilon' must be a positive number"),
    ({"max-epsilon": float("inf")}, "'max-epsilon' must be a positive number"),
    ({"test-fraction": 1.0}, "'test-fraction' must be in"),
    ({"max-rounds": 0}, "'max-rounds' must be at least 1"),
    ({"min-secure-cohort": 2}, "'min-secure-cohort' must be at least 3"),
    ({"min-secure-cohort": 3.5}, "'min-secure-cohort' must be an integer"),
    ({"evaluate": "yes"}, "'evaluate' 'yes' is not one of off, dp, non-sensitive"),
    ({"evaluate": True}, "'evaluate' = true no longer exists"),
    ({"evaluate": "non-sensitive"}, "non-sensitive needs test-data-path"),
    ({"model-dir": None}, "'model-dir' is required in a deployment"),
    ({"data_path": "/x.jsonl"}, "unknown key 'data_path'"),
    ({"wire-dtypes": "float64"}, "'wire-dtypes' must name some of float16, float32"),
    ({"min-clip-norm": 0.0}, "'min-clip-norm' must be a positive number"),
    ({"max-lora-dropout": 1.0}, "'max-lora-dropout' must be in"),
    ({"max-window": 8}, "'max-window' must be at least 16 tokens"),
    ({"verbalizers": "0=negative"}, "'verbalizers'"),
    ({"ledger-dir": "relative"}, "'ledger-dir' must be an absolute path"),
])
def test_a_bad_node_config_is_one_line_naming_the_key(tmp_path, extra, message):
    config = {k: v for k, v in {**site_config(tmp_path), **extra}.items() if v is not None}
    with pytest.raises(UserError, match=message):
        SitePolicy.from_node_config(config)


@pytest.mark.parametrize("name", ["", "../up", ".hidden", "a/b", "x" * 65, 3])
def test_a_site_name_must_be_a_plain_directory_name(name):
    with pytest.raises(UserError, match="node config key 'name'"):
        site_name(name)
