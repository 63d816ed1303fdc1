"""The site's own policy: everything that decides a site's privacy, from what the site trusts.

A site trusts its node config, its installed code and its disk; it trusts nothing the
coordinator sends (docs/THREAT-MODEL.md). So the budget, delta, which records are trained
on and which are held out, the ledger's identity, the noise source and whether the site
evaluates at all are fields of ``SitePolicy``, read from the node config in a deployment,
never from the run config. The coordinator's run config and messages are a request
(client.request), validated and bounded against this policy.

In a simulation the researcher is both the coordinator and every site: the policy is
built from the run config, which is then the researcher's own trusted file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from client.data import DataSpec
from client.units import PrivacyUnit
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import DELTA, DEVICE, SITE_OWNED, RunConfig
from slm.tasks import parse_verbalizers

# node config key -> (type, default, meaning). Keys not listed here are refused (deploy/node_config.py at
# start-up, SitePolicy.from_node_config in every ClientApp process).
NODE_KEYS: dict[str, tuple[type, object, str]] = {
    "name": (str, None, "the site's name in the coordinator's view (required in a deployment)"),
    "data-path": (str, None, "the site's own training records (JSONL / CSV / TSV / Parquet)"),
    "ledger-dir": (str, None, "where the site's privacy ledger persists across runs"),
    "max-epsilon": (float, None, "the site's own budget over all rounds and runs"),
    "model-dir": (str, None, "'smollm2', 'tiny' or a local HF model directory: the base the site trains and "
                  "evaluates on (required: a coordinator's model.name would reveal which directories exist)"),
    "fields": (str, "", "comma-separated columns of data-path the coordinator may name as the task's fields "
               "(prompt/response, text, label); a request naming any other column is refused unread"),
    "verbalizers": (str, "", "label tasks: the site's approved value=word pairs; a label request must use exactly "
                    "these (label values leave only as these words)"),
    "delta": (float, 0.0, "the site's delta; 0 = min(1e-5, 0.1 / records); fixed when the ledger is created"),
    "test-data-path": (str, "", "held-out records, evaluated and never trained on (else a share of data-path)"),
    "test-fraction": (float, 0.1, "share of data-path held out when there is no test-data-path (by record hash)"),
    "max-train-examples": (int, 0, "train on at most this many records (0 = all)"),
    "max-eval-examples": (int, 32, "evaluate on at most this many held-out records (0 = all)"),
    "evaluate": (str, "off", "off = answer no evaluation request; dp = held-out metrics with Gaussian noise, "
                 "charged to the ledger; non-sensitive = clear metrics on test-data-path, which the site declares "
                 "non-sensitive (docs/THREAT-MODEL.md)"),
    "max-evaluations-per-run": (int, 8, "most evaluation requests the site answers in one run"),
    "evaluation-noise-multiplier": (float, 10.0, "evaluate = dp: noise std / sensitivity of the noised sums"),
    "evaluation-loss-bound": (float, 5.0, "evaluate = dp: each record's loss is clipped to [0, this] (nats)"),
    "max-noise-multiplier": (float, 5.0, "most noise the site trains with; needing more = budget exhausted"),
    "max-rounds": (int, 1000, "most rounds a coordinator may plan in one run (bounds the noise plan)"),
    "max-local-steps": (int, 1000, "most DP-SGD steps one round may ask for"),
    "min-clip-norm": (float, 0.01, "the smallest clip norm a request may ask for"),
    "max-lr": (float, 0.1, "the largest learning rate a request may ask for"),
    "max-lora-dropout": (float, 0.5, "the largest LoRA dropout a request may ask for"),
    "max-window": (int, 512, "the most tokens per example a request may ask for (model.max-length, or its cap when "
                   "it is 0): a step's memory and time grow with it"),
    "wire-dtypes": (str, "float16", "comma-separated dtypes the site sends its update in (float16, float32)"),
    "shipped-dir": (str, "", "where verified shipped models are stored"),
    "device": (str, "", "where this site trains: auto, cpu, cuda or cuda:N (else the run config's model.device)"),
    "require-secure-aggregation": (bool, False, "train only in secure-aggregation rounds: a clear train request "
                                   "(which would show the coordinator this site's update) is refused"),
    "privacy-unit-field": (str, "", "column of data-path naming whom each record is about (e.g. patient_id): the "
                           "site then protects each such unit with all of its records (unit-level DP-SGD, "
                           "client.unit_sgd); empty = each record. Never sent, never a task field"),
    "max-records-per-unit": (int, 8, "with privacy-unit-field: most records of one unit used in one step (k)"),
    "privacy-unit-name": (str, "person", "with privacy-unit-field: the word reports use for a unit (patient, user)"),
    "group-field": (str, "", "record-level sites: column naming whose record it is; `fedslm budget` states what the "
                    "record-level epsilon means for the person with the most records (never sent)"),
    "min-secure-cohort": (int, 3, "with require-secure-aggregation: the fewest sites (this one included) that must "
                          "share keys with this one in a SecAgg+ round, at least 3; the threshold must exceed half "
                          "of them (client.secure_aggregation)"),
}
REQUIRED = ("name", "data-path", "ledger-dir", "max-epsilon", "model-dir")
SIMULATION_KEYS = ("partition-id", "num-partitions")  # what Flower's simulation engine puts in a node config
GUARD_ENV = "FEDSLM_APPROVED_APPS"  # set for every ClientApp a site's app guard starts (deploy/app_guard.py)
EVALUATION_MODES = ("off", "dp", "non-sensitive")
WIRE_DTYPES = ("float16", "float32")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a directory name under a ledger dir

def site_name(value) -> str:
    """A node config's ``name``, checked: it becomes a directory name and the site's identity."""
    if not isinstance(value, str) or not SITE_NAME.fullmatch(value):
        raise UserError(f"node config key 'name': {value!r} is not a site name "
                        "(letters, digits, '.', '_', '-'; at most 64; not starting with '.', '_' or '-')")
    return value


def is_deployment(node_config, environ=None) -> bool:
    """A deployed site, failing closed: any key but the simulation engine's, or the site's app guard.

    A misspelt or partial node config is still a deployment (its policy then refuses to
    load, and every message is refused); only a node config holding nothing but Flower's
    simulation keys, in a process no app guard started, is a simulated client whose policy
    is the researcher's run config.
    """
    environ = os.environ if environ is None else environ
    return bool(set(node_config) - set(SIMULATION_KEYS)) or bool(environ.get(GUARD_ENV))


@dataclass(frozen=True)
class SitePolicy:
    """What one site decides for itself. Frozen: nothing the coordinator sends can change it."""

    name: str
    deployment: bool
    ledger_dir: Path
    max_epsilon: float
    delta: float  # 0 = min(1e-5, 0.1 / records) when the ledger is created
    max_noise_multiplier: float
    max_rounds: int
    max_local_steps: int
    dp_enabled: bool
    noise_seed: int  # -1 = fresh OS entropy per round (always, in a deployment)
    evaluate: str  # off | dp | non-sensitive (a simulation: clear, the researcher's own records)
    require_secure_aggregation: bool  # the coordinator cannot switch SecAgg+ off for this site
    model_dir: str  # '' = the run config's model.name
    device: str  # '' = the run config's model.device
    shipped_dir: str  # '' = <run dir>/shipped (simulation)
    data_path: str
    test_data_path: str
    test_fraction: float
    max_train: int
    max_eval: int
    fields: tuple[str, ...] | None = None  # columns a request may name (None: any, a simulation)
    verbalizers: str = ""  # a label task's approved value=word pairs ('' in a simulation: the run config's)
    min_clip_norm: float = 0.0
    max_lr: float = math.inf
    max_lora_dropout: float = 1.0
    max_window: int = 10**9  # tokens per example (a simulation: the researcher's own setting)
    wire_dtypes: tuple[str, ...] = WIRE_DTYPES
    max_evaluations: int = 0  # per run (0 = no cap: a simulation)
    evaluation_noise: float = 0.0  # evaluate = dp: sigma of the noised sums
    evaluation_loss_bound: float = 0.0  # evaluate = dp: per-record loss clipped to [0, this]
    min_secure_cohort: int = 3  # SecAgg+ rounds with fewer sites sharing keys are refused (client.secure_aggregation)
    unit: PrivacyUnit = PrivacyUnit()  # whom the guarantee protects (client.units): the record by default
    group_field: str = ""  # record-level: whose record it is, for the group-privacy statement only

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_node_config(cls, node_config, where: str = "node config") -> "SitePolicy":
        """A deployed site's policy; every key checked, one line naming the key if wrong."""
        unknown = sorted(set(node_config) - set(NODE_KEYS) - set(SIMULATION_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(NODE_KEYS)})")
        values = {}
        for key, (kind, default, _) in NODE_KEYS.items():
            if key not in node_config:
                if key in REQUIRED:
                    raise UserError(f"{where}: '{key}' is required in a deployment ({NODE_KEYS[key][2]})")
                values[key] = default
                continue
            values[key] = _typed(where, key, node_config[key], kind)
        policy = cls(
            name=site_name(values["name"]), deployment=True, ledger_dir=Path(values["ledger-dir"]),
            max_epsilon=values["max-epsilon"], delta=values["delta"],
            max_noise_multiplier=values["max-noise-multiplier"], max_rounds=values["max-rounds"],
            max_local_steps=values["max-local-steps"], dp_enabled=True, noise_seed=-1, evaluate=values["evaluate"],
            require_secure_aggregation=values["require-secure-aggregation"], model_dir=values["model-dir"],
            device=values["device"], shipped_dir=values["shipped-dir"], data_path=values["data-path"],
            test_data_path=values["test-data-path"], test_fraction=values["test-fraction"],
            max_train=values["max-train-examples"], max_eval=values["max-eval-examples"],
            fields=_names(values["fields"]), verbalizers=values["verbalizers"],
            min_clip_norm=values["min-clip-norm"], max_lr=values["max-lr"],
            max_lora_dropout=values["max-lora-dropout"], max_window=values["max-window"],
            wire_dtypes=_names(values["wire-dtypes"]),
            max_evaluations=values["max-evaluations-per-run"],
            evaluation_noise=values["evaluation-noise-multiplier"],
            evaluation_loss_bound=values["evaluation-loss-bound"],
            min_secure_cohort=values["min-secure-cohort"],
            unit=PrivacyUnit(values["privacy-unit-field"], values["max-records-per-unit"], values["privacy-unit-name"]),
            group_field=values["group-field"])
        policy.check(where)
        return policy

    @classmethod
    def for_simulation(cls, specs: RunConfig, name: str, run_dir: str) -> "SitePolicy":
        """A simulated client: the researcher's run config is its policy."""
        dp, site = specs.dp, specs.site_data
        ledger_root = Path(dp.ledger_dir or Path(run_dir) / "ledgers")
        policy = cls(
            name=name, deployment=False, ledger_dir=ledger_root / name, max_epsilon=dp.max_epsilon, delta=dp.delta,
            max_noise_multiplier=dp.max_noise_multiplier, max_rounds=10**6, max_local_steps=10**6,
            dp_enabled=dp.enabled, noise_seed=dp.noise_seed, evaluate="clear", require_secure_aggregation=False,
            model_dir="", device="", shipped_dir=specs.ship.dir, data_path=site.path, test_data_path="",
            test_fraction=site.test_fraction, max_train=site.max_train_examples, max_eval=site.max_eval_examples,
            unit=PrivacyUnit(dp.privacy_unit_field, dp.max_records_per_unit, dp.privacy_unit_name),
            group_field=dp.group_field)
        policy.check("run config")
        return policy

    def check(self, where: str) -> None:
        def bad(key: str, why: str):
            raise UserError(f"{where}: '{key}' {why}")

        if self.device and not DEVICE.fullmatch(self.device):
            bad("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            bad("max-epsilon", f"must be a positive number, got {self.max_epsilon!r}")
        if not DELTA.admits(self.delta):  # the same rule as the run config's dp.delta (fedslm.common.config)
            bad("delta", f"must be {DELTA} (0 = the default), got {self.delta!r}")
        if not (math.isfinite(self.max_noise_multiplier) and self.max_noise_multiplier > 0):
            bad("max-noise-multiplier", f"must be a positive number, got {self.max_noise_multiplier!r}")
        if not 0 <= self.test_fraction < 1:
            bad("test-fraction", f"must be in [0, 1), got {self.test_fraction!r}")
        for key, value in (("max-rounds", self.max_rounds), ("max-local-steps", self.max_local_steps)):
            if value < 1:
                bad(key, f"must be at least 1, got {value}")
        self.unit.check(where)
        if self.unit.field and self.group_field:
            bad("group-field", "is for record-level sites; with privacy-unit-field the guarantee is already per unit")
        if self.fields is not None and (self.unit.field or self.group_field) in self.fields:
            bad("fields", f"must not list {self.unit.field or self.group_field!r}: the column naming a person "
                          "never becomes a task's text")
        if self.min_secure_cohort < 3:  # with 2, each site learns the other's update from the sum
            bad("min-secure-cohort", f"must be at least 3, got {self.min_secure_cohort}")
        for key, value in (("max-train-examples", self.max_train), ("max-eval-examples", self.max_eval)):
            if value < 0:
                bad(key, f"must be 0 or more, got {value}")
        if self.deployment:
            if self.evaluate not in EVALUATION_MODES:
                bad("evaluate", f"{self.evaluate!r} is not one of {', '.join(EVALUATION_MODES)}")
            if self.evaluate == "non-sensitive" and not self.test_data_path:
                bad("evaluate", "non-sensitive needs test-data-path: the file the site declares non-sensitive")
            unknown = [d for d in self.wire_dtypes if d not in WIRE_DTYPES]
            if unknown or not self.wire_dtypes:
                bad("wire-dtypes", f"must name some of {', '.join(WIRE_DTYPES)}, got {', '.join(self.wire_dtypes)!r}")
            for key, value in (("min-clip-norm", self.min_clip_norm), ("max-lr", self.max_lr),
                               ("evaluation-noise-multiplier", self.evaluation_noise),
                               ("evaluation-loss-bound", self.evaluation_loss_bound)):
                if not (math.isfinite(value) and value > 0):
                    bad(key, f"must be a positive number, got {value!r}")
            if not 0 <= self.max_lora_dropout < 1:
                bad("max-lora-dropout", f"must be in [0, 1), got {self.max_lora_dropout!r}")
            if self.max_window < 16:
                bad("max-window", f"must be at least 16 tokens, got {self.max_window}")
            if self.max_evaluations < 0:
                bad("max-evaluations-per-run", f"must be 0 or more, got {self.max_evaluations}")
            if self.verbalizers:
                try:
                    parse_verbalizers(self.verbalizers)
                except UserError as err:
                    bad("verbalizers", str(err).split(": ", 1)[-1])
            for key, value in (("data-path", self.data_path), ("ledger-dir", str(self.ledger_dir)),
                               ("test-data-path", self.test_data_path), ("shipped-dir", self.shipped_dir)):
                if value and not Path(value).is_absolute():
                    bad(key, f"must be an absolute path, got {value!r}")

    # ---- what the rest of the client reads -----------------------------------------
    def data_spec(self, request: RunConfig) -> DataSpec:
        """How to read this site's records: the task's fields from the request, the rest from the site."""
        spec = DataSpec.of(request)
        if not self.deployment:
            return spec
        return DataSpec(
            path=self.data_path, task=spec.task, prompt_field=spec.prompt_field, response_field=spec.response_field,
            text_field=spec.text_field, label_field=spec.label_field, verbalizers=spec.verbalizers,
            partition="iid", partition_by="", dirichlet_alpha=0.0, test_fraction=self.test_fraction,
            max_train=self.max_train, max_eval=self.max_eval, seed=0, split="record-hash",
            test_path=self.test_data_path, unit_field=self.person_field)

    @property
    def person_field(self) -> str:
        """The column naming whom a record is about ('' = unknown): the held-out split keeps a person whole."""
        return self.unit.field or self.group_field

    def model_name(self, request: RunConfig) -> str:
        return self.model_dir or request.model.name

    def device_name(self, request: RunConfig) -> str:
        """The site's device, else the run config's model.device (the hardware is the site's)."""
        return self.device or request.model.device

    def ignored_requests(self, run_config) -> list[str]:
        """Site-owned settings the coordinator's run config tried to set (logged, never applied)."""
        if not self.deployment:
            return []
        from fedslm.common.vocabulary import SCHEMA

        mine = {"data.path": self.data_path, "dp.max-epsilon": self.max_epsilon, "dp.delta": self.delta,
                "dp.enabled": True, "dp.noise-seed": -1, "dp.ledger-dir": str(self.ledger_dir),
                "dp.privacy-unit-field": self.unit.field, "dp.max-records-per-unit": self.unit.max_records,
                "dp.privacy-unit-name": self.unit.name, "dp.group-field": self.group_field}
        found = []
        for key in SITE_OWNED:
            if key in run_config and run_config[key] != SCHEMA[key].default and run_config[key] != mine.get(key):
                found.append(f"{key}={run_config[key]!r}")
        return found


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _typed(where: str, key: str, value, kind: type):
    if key == "evaluate" and isinstance(value, bool):  # the boolean of older node configs
        if value:
            raise UserError(f"{where}: 'evaluate' = true no longer exists (it sent clear metrics of held-out "
                            f"records for any adapter); choose one of {', '.join(EVALUATION_MODES)}")
        return "off"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: '{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise UserError(f"{where}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {value!r}")
    return value
