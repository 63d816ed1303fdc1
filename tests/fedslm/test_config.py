import tomllib
from pathlib import Path

import pytest

from fedslm.common.config import parse_assignment, request_config, resolve
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RANGES, SCHEMA, Dp, Lora, RunConfig, defaults, toml_table

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_are_the_generated_table():
    """`flwr run .` reads pyproject; the simulator reads the vocabulary: pyproject holds `fedslm keys --toml`."""
    text = (ROOT / "pyproject.toml").read_text()
    table = ["[tool.flwr.app.config]", *toml_table(defaults())]
    start = text.splitlines().index(table[0])
    assert text.splitlines()[start:start + len(table) + 1] == [*table, ""], "run `fedslm keys --toml` into pyproject"
    pyproject = tomllib.loads(text)
    assert pyproject["tool"]["flwr"]["app"]["config"] == defaults()
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_overrides_are_typed_and_layered():
    config = resolve({"server.rounds": "5", "dp.enabled": "false"}, base={"server.rounds": 2, "train.lr": "0.1"})
    assert config["server.rounds"] == 5 and config["dp.enabled"] is False and config["train.lr"] == 0.1
    assert set(config) == set(SCHEMA)


@pytest.mark.parametrize("overrides, words", [
    ({"dp.epsilon": 3}, ["unknown config key 'dp.epsilon'"]),
    ({"server.rounds": "three"}, ["server.rounds", "integer"]),
    ({"server.rounds": 2.5}, ["server.rounds", "integer"]),
    ({"dp.enabled": "maybe"}, ["dp.enabled", "true or false"]),
    ({"data.task": "chat"}, ["data.task", "sft, label, next-word"]),
])
def test_bad_config_names_the_key(overrides, words):
    with pytest.raises(UserError) as err:
        resolve(overrides)
    assert all(w in str(err.value) for w in words)
    assert "\n" not in str(err.value)


def test_parse_assignment():
    assert parse_assignment("lora.r = 4") == ("lora.r", "4")
    with pytest.raises(UserError, match="key=value"):
        parse_assignment("lora.r")


@pytest.mark.parametrize("key, value, words", [
    ("dp.delta", 2, "in (0, 0.001] or 0"),
    ("dp.delta", -1e-6, "in (0, 0.001] or 0"),
    ("user-dp.delta", 0.5, "in (0, 0.001] or 0"),
    ("dp.max-epsilon", -1, "> 0"),
    ("dp.target-epsilon", -1, ">= 0"),
    ("dp.clip-norm", 0, "> 0"),
    ("dp.noise-multiplier", -0.5, ">= 0"),
    ("dp.max-noise-multiplier", 0, "> 0"),
    ("train.lr", -0.01, "> 0 or 0"),
    ("train.lr", "nan", "> 0 or 0"),
    ("train.local-steps", 0, ">= 1"),
    ("server.fraction-train", 0, "in (0, 1]"),
    ("server.fraction-evaluate", 1.5, "in (0, 1]"),
    ("data.test-fraction", 1, "in [0, 1)"),
    ("data.dirichlet-alpha", 0, "> 0"),
    ("lora.r", 0, ">= 1"),
    ("lora.dropout", 1, "in [0, 1)"),
    ("model.max-length", 4, ">= 16 or 0"),
    ("model.max-length-cap", 0, ">= 16"),
    ("user-dp.clip-norm", 0, "> 0"),
    ("user-dp.noise-multiplier", -1, ">= 0"),
])
def test_out_of_range_values_are_one_line_naming_the_key_and_the_range(key, value, words):
    with pytest.raises(UserError) as err:
        resolve({key: value})
    assert str(err.value).startswith(f"config key '{key}': must be {words}, got ") and "\n" not in str(err.value)


def test_ranges_name_real_keys_and_admit_the_defaults_and_special_values():
    assert set(RANGES) <= set(SCHEMA)
    resolve({"dp.delta": 0, "user-dp.delta": 1e-3, "dp.target-epsilon": 0, "data.test-fraction": 0,
             "server.fraction-train": 1, "dp.noise-seed": -1})


def test_a_sites_request_is_typed_but_its_ranges_are_the_sites_to_judge():
    """A deployed site refuses or ignores an out-of-range request with a reason (client.request, client.site)."""
    assert request_config({"dp.delta": 0.2, "dp.clip-norm": 0.0})["dp.delta"] == 0.2
    with pytest.raises(UserError, match="unknown config key"):
        request_config({"dp.epsilon": 1})


def test_every_key_has_an_owner_and_no_site_reads_a_server_key():
    """Issue 26 item 1: who decides a key lives in the schema; a key marked server is read by no site's code."""
    import dataclasses
    import re
    from pathlib import Path

    from fedslm.common.vocabulary import CONCEPTS, OWNERS, SCHEMA, SITE_OWNED

    assert all(key.owner in OWNERS for key in SCHEMA.values())
    assert {n for n, k in SCHEMA.items() if k.owner == "site"} == set(SITE_OWNED)
    root = Path(__file__).resolve().parents[2]
    prefixes = {f.name: kind.PREFIX for f, kind in zip(dataclasses.fields(RunConfig), CONCEPTS)}
    read, aliased = set(), []  # a site reads typed specs: specs.server.wire_dtype is server.wire-dtype
    for path in [*(root / "client").glob("*.py"), *(root / "deploy").glob("*.py")]:
        text = path.read_text()
        for concept_name, field in re.findall(rf"\bspecs\.({'|'.join(prefixes)})\.([a-z_]+)\b", text):
            read |= {f"{prefixes[concept_name]}.{field.replace('_', '-')}"} & set(SCHEMA)
        aliased += re.findall(r"=\s*(?:request\.)?specs\.(?:server|user_dp|ship|run)\b(?!\.)", text)
    assert not aliased, "read the server's concepts as specs.server.<field>, so this test sees each key"
    assert {"server.wire-dtype", "server.max-update-norm", "user-dp.enabled", "train.lr"} <= read
    assert not {name for name in read if SCHEMA[name].owner == "server"}
    assert SCHEMA["server.rounds"].owner == "server" and SCHEMA["server.wire-dtype"].owner == "coordinator"


def test_the_learning_rate_left_at_0_is_the_measured_best_for_dp_or_not_and_is_stored_resolved():
    """BENCHMARKS.md 17: 3e-2 under DP-SGD (1e-2 kept 25-30% of the demo's gain), 1e-2 without (3e-2 diverged).
    Resolved where the config is read, so config.json, a site's request and the report hold the number."""
    from fedslm.common.config import request_config
    from fedslm.common.vocabulary import DP_LR, PLAIN_LR

    assert resolve()["train.lr"] == DP_LR == 3e-2
    assert resolve({"dp.enabled": False})["train.lr"] == PLAIN_LR == 1e-2
    assert resolve({"train.lr": 5e-3})["train.lr"] == 5e-3
    assert request_config({"dp.enabled": True})["train.lr"] == DP_LR  # what a site reads from a coordinator


def test_the_typed_specs_are_the_flat_keys_and_back():
    """Issue 26 item 1: each concept a frozen spec whose fields are its keys (type, default, range, owner)."""
    config = resolve({"lora.target-modules": "q_proj", "dp.max-epsilon": 3, "data.path": "x.jsonl"})
    specs = RunConfig.parse(config)
    assert specs.lora == Lora(target_modules="q_proj") and specs.dp.max_epsilon == 3.0
    assert specs.site_data.path == "x.jsonl" and specs.train.lr == 3e-2  # resolved, as config.json holds it
    assert specs.flat() == config and list(specs.flat()) == list(SCHEMA)
    with pytest.raises(Exception):
        specs.dp.max_epsilon = 100  # frozen: a spec read is a fact, never a place to write
    assert SCHEMA["dp.clip-norm"].owner == "coordinator" and SCHEMA["dp.max-epsilon"].owner == "site"
    assert SCHEMA["dp.delta"].range is RANGES["dp.delta"] and Dp.__dataclass_fields__["delta"].default == 0.0


def test_auto_aggregation_is_resolved_when_read_ffa_under_dp():
    """config.json holds the aggregation used; the report never re-derives "auto" with today's rule."""
    assert resolve()["server.aggregation"] == "ffa" and resolve({"dp.enabled": False})["server.aggregation"] == "fedavg"
    assert resolve({"server.aggregation": "svd"})["server.aggregation"] == "svd"
    assert resolve({"server.aggregation": "fedavg"})["server.aggregation"] == "fedavg"


def test_the_rooms_on_typed_specs_read_no_raw_keys():
    """Issue 26 item 1: where a room takes RunConfig, a config["..."] read would be a second way in.

    The parser (fedslm/common/config.py) is the one place that reads the flat keys. server/ parses once
    (server/app.py) and passes the specs down; client/ parses the coordinator's request once (client/request.py)
    and its own simulation config once (client/app.py); the entry points (fedslm/cli) parse what they resolve;
    the report reads a run's recorded config.json as typed specs (privacy/report/run_files.py). Writing a key
    into the flat config Flower takes (the preflight's resolved verbalizers, the window) is not a read."""
    import re

    rooms = ("server", "client", "simulation", "slm", "privacy", "fedslm/cli", "deploy")
    typed = sorted(path for room in rooms for path in (ROOT / room).rglob("*.py"))
    raw = [f"{path.relative_to(ROOT)}: {match}" for path in typed
           for match in re.findall(r'\w+\[["\'](?:model|lora|data|train|dp|server|user-dp|ship|run)\.[a-z-]+["\']\]'
                                   r'(?!\s*=[^=])', path.read_text())]
    assert len(typed) > 100 and raw == []


def test_auto_target_modules_are_the_measured_best_for_the_task_kind():
    """BENCHMARKS.md 18: all four attention projections for a label task, q and v otherwise; an explicit list wins."""
    assert resolve({"data.task": "label"})["lora.target-modules"] == "q_proj,k_proj,v_proj,o_proj"
    assert resolve()["lora.target-modules"] == resolve({"data.task": "next-word"})["lora.target-modules"] == \
        "q_proj,v_proj"
    assert resolve({"data.task": "label", "lora.target-modules": "q_proj"})["lora.target-modules"] == "q_proj"
