import tomllib
from pathlib import Path

import pytest

from slm.config import SCHEMA, defaults, parse_assignment, resolve
from slm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_mirror_the_schema():
    """`flwr run .` reads pyproject; the simulator reads SCHEMA: they must never drift."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
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
