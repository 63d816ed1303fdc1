"""Reading a run config: layered, typed and checked against the vocabulary, with one-line errors.

Flower hands the ServerApp and each ClientApp a flat ``run_config`` (dotted keys from
``[tool.flwr.app.config]`` plus overrides); a simulation layers the defaults, a scenario and
the user's ``--set``. The keys, types, ranges and owners are fedslm.common.vocabulary's.
Unknown keys and wrongly typed values are rejected with one line naming the key, because a
typo in a privacy setting must never be ignored. Values that mean "derive it" are derived
here, once (``train.lr`` 0, ``lora.target-modules`` and ``server.aggregation`` auto), so config.json, a site's request and the report hold the number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import DP_LR, LABEL_TARGETS, PLAIN_LR, RANGES, SCHEMA, TARGETS, Task, defaults

# A run id: what sites accept (client.request.RUN_ID, 128 characters) less room for the '-N' a re-used id gets.
RUN_ID_MAX = 120
RUN_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:+-]{{0,{RUN_ID_MAX - 1}}}")

def _coerce(name: str, value: object) -> object:
    default = SCHEMA[name].default
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"config key '{name}': expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{name}': expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{name}': expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise UserError(f"config key '{name}': expected an integer, got {value!r}")
        return int(as_float)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{name}': expected a number, got {value!r}") from None
    return str(value)


def resolve(overrides: Mapping[str, object] | None = None, base: Mapping[str, object] | None = None) -> dict:
    """Defaults, then ``base`` (a scenario), then ``overrides`` (the user), all validated, ranges included."""
    config = _typed((base or {}, overrides or {}))
    for name, rule in RANGES.items():
        if name in config and not rule.admits(config[name]):
            raise UserError(f"config key '{name}': must be {rule}, got {config[name]!r}")
    if config["run.id"] and not RUN_ID.fullmatch(config["run.id"]):
        raise UserError(f"config key 'run.id': {config['run.id'][:40]!r} must be 1-{RUN_ID_MAX} letters, digits or "
                        ". _ : + - (sites write it to their ledger and log; a re-used id gets '-2', which must fit too)")
    return config


def _typed(layers) -> dict:
    config = defaults()
    for layer in layers:
        for name, value in layer.items():
            if name not in SCHEMA:
                raise UserError(f"unknown config key '{name}' (see `fedslm keys`)")
            config[name] = _coerce(name, value)
    for name, key in SCHEMA.items():
        if key.choices and config[name] not in key.choices:
            raise UserError(f"config key '{name}': {config[name]!r} is not one of {', '.join(key.choices)}")
    # "Derive it" values are resolved here, so config.json, the sites' requests and reports hold what was used.
    if config["train.lr"] == 0:
        config["train.lr"] = DP_LR if config["dp.enabled"] else PLAIN_LR
    if config["lora.target-modules"] == "auto":
        config["lora.target-modules"] = LABEL_TARGETS if config["data.task"] == "label" else TARGETS
    if config["server.aggregation"] == "auto":
        config["server.aggregation"] = "ffa" if config["dp.enabled"] else "fedavg"
    return config


def from_run_config(run_config: Mapping[str, object]) -> dict:
    """Validate what Flower passed in (defaults are already fused in by Flower), ranges included."""
    return resolve(run_config)


def request_config(run_config: Mapping[str, object]) -> dict:
    """A coordinator's run config as a site reads it: known keys, typed, choices checked; no ranges.

    At a site the run config is a request, not a setting (docs/THREAT-MODEL.md): the values
    that matter to its privacy are its own (client.site) or bounded by it (client.request),
    which refuses an out-of-range request with its reason in the reply instead of failing.
    """
    return _typed((run_config,))


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a ``--set key=value`` argument."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--set {text!r}: expected key=value")
    return name.strip(), value.strip()


def describe_fields(task: Task) -> str:
    """The fields a run reads from its data file (and a label task's label count), in words.

    For the console banner and the privacy report: they describe the data actually used.
    """
    if task.task == "sft":
        return f"prompt field '{task.prompt_field}', response field '{task.response_field}'"
    text = f"text field '{task.text_field}'"
    if task.task != "label":
        return text
    labels = len([pair for pair in task.verbalizers.split(",") if pair.strip()])
    return f"{text}, label field '{task.label_field}', " + (f"{labels} labels" if labels else "labels from the file")
