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
import re
from dataclasses import dataclass
from pathlib import Path

from client.data import DataSpec
from slm.config import DELTA, DEVICE
from slm.errors import UserError

# node config key -> (type, default, meaning). Keys not listed here are refused by deploy/node_config.py.
NODE_KEYS: dict[str, tuple[type, object, str]] = {
    "name": (str, None, "the site's name in the coordinator's view (required in a deployment)"),
    "data-path": (str, None, "the site's own training records (JSONL / CSV / TSV / Parquet)"),
    "ledger-dir": (str, None, "where the site's privacy ledger persists across runs"),
    "max-epsilon": (float, None, "the site's own budget over all rounds and runs"),
    "delta": (float, 0.0, "the site's delta; 0 = min(1e-5, 0.1 / records); fixed when the ledger is created"),
    "test-data-path": (str, "", "held-out records, evaluated and never trained on (else a share of data-path)"),
    "test-fraction": (float, 0.1, "share of data-path held out when there is no test-data-path (by record hash)"),
    "max-train-examples": (int, 0, "train on at most this many records (0 = all)"),
    "max-eval-examples": (int, 32, "evaluate on at most this many held-out records (0 = all)"),
    "evaluate": (bool, True, "answer evaluation requests (their metrics leave in clear, see THREAT-MODEL.md)"),
    "max-noise-multiplier": (float, 5.0, "most noise the site trains with; needing more = budget exhausted"),
    "max-rounds": (int, 1000, "most rounds a coordinator may plan in one run (bounds the noise plan)"),
    "max-local-steps": (int, 1000, "most DP-SGD steps one round may ask for"),
    "model-dir": (str, "", "'smollm2', 'tiny' or a local HF model directory (else the run config's)"),
    "shipped-dir": (str, "", "where verified shipped models are stored"),
    "device": (str, "", "where this site trains: auto, cpu, cuda or cuda:N (else the run config's model.device)"),
    "require-secure-aggregation": (bool, False, "train only in secure-aggregation rounds: a clear train request "
                                   "(which would show the coordinator this site's update) is refused"),
    "min-secure-cohort": (int, 3, "with require-secure-aggregation: the fewest sites (this one included) that must "
                          "share keys with this one in a SecAgg+ round, at least 3; the threshold must exceed half "
                          "of them (client.secure_aggregation)"),
}
REQUIRED = ("name", "data-path", "ledger-dir", "max-epsilon")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a directory name under a ledger dir

# Run-config keys that a deployment takes from the site, never from the coordinator.
SITE_OWNED = ("data.path", "data.eval-path", "data.partition", "data.partition-by", "data.dirichlet-alpha", "data.test-fraction",
              "data.max-train-examples", "data.max-eval-examples", "data.seed", "dp.enabled", "dp.max-epsilon",
              "dp.delta", "dp.max-noise-multiplier", "dp.noise-seed", "dp.ledger-dir", "ship.dir")


def site_name(value) -> str:
    """A node config's ``name``, checked: it becomes a directory name and the site's identity."""
    if not isinstance(value, str) or not SITE_NAME.fullmatch(value):
        raise UserError(f"node config key 'name': {value!r} is not a site name "
                        "(letters, digits, '.', '_', '-'; at most 64; not starting with '.', '_' or '-')")
    return value


def is_deployment(node_config) -> bool:
    return "data-path" in node_config


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
    evaluate: bool
    require_secure_aggregation: bool  # the coordinator cannot switch SecAgg+ off for this site
    model_dir: str  # '' = the run config's model.name
    device: str  # '' = the run config's model.device
    shipped_dir: str  # '' = <run dir>/shipped (simulation)
    data_path: str
    test_data_path: str
    test_fraction: float
    max_train: int
    max_eval: int
    min_secure_cohort: int = 3  # SecAgg+ rounds with fewer sites sharing keys are refused (client.secure_aggregation)

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_node_config(cls, node_config, where: str = "node config") -> "SitePolicy":
        """A deployed site's policy; every key checked, one line naming the key if wrong."""
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
            require_secure_aggregation=values["require-secure-aggregation"], model_dir=values["model-dir"], device=values["device"], shipped_dir=values["shipped-dir"],
            data_path=values["data-path"], test_data_path=values["test-data-path"],
            test_fraction=values["test-fraction"],
            max_train=values["max-train-examples"], max_eval=values["max-eval-examples"],
            min_secure_cohort=values["min-secure-cohort"])
        policy.check(where)
        return policy

    @classmethod
    def for_simulation(cls, config: dict, name: str, run_dir: str) -> "SitePolicy":
        """A simulated client: the researcher's run config is its policy."""
        ledger_root = Path(config["dp.ledger-dir"] or Path(run_dir) / "ledgers")
        policy = cls(
            name=name, deployment=False, ledger_dir=ledger_root / name, max_epsilon=config["dp.max-epsilon"],
            delta=config["dp.delta"], max_noise_multiplier=config["dp.max-noise-multiplier"], max_rounds=10**6,
            max_local_steps=10**6, dp_enabled=config["dp.enabled"], noise_seed=config["dp.noise-seed"],
            evaluate=True, require_secure_aggregation=False, model_dir="", device="", shipped_dir=config["ship.dir"], data_path=config["data.path"],
            test_data_path="", test_fraction=config["data.test-fraction"],
            max_train=config["data.max-train-examples"], max_eval=config["data.max-eval-examples"])
        policy.check("run config")
        return policy

    def check(self, where: str) -> None:
        def bad(key: str, why: str):
            raise UserError(f"{where}: '{key}' {why}")

        if self.device and not DEVICE.fullmatch(self.device):
            bad("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            bad("max-epsilon", f"must be a positive number, got {self.max_epsilon!r}")
        if not DELTA.admits(self.delta):  # the same rule as the run config's dp.delta (slm.config)
            bad("delta", f"must be {DELTA} (0 = the default), got {self.delta!r}")
        if not (math.isfinite(self.max_noise_multiplier) and self.max_noise_multiplier > 0):
            bad("max-noise-multiplier", f"must be a positive number, got {self.max_noise_multiplier!r}")
        if not 0 <= self.test_fraction < 1:
            bad("test-fraction", f"must be in [0, 1), got {self.test_fraction!r}")
        for key, value in (("max-rounds", self.max_rounds), ("max-local-steps", self.max_local_steps)):
            if value < 1:
                bad(key, f"must be at least 1, got {value}")
        if self.min_secure_cohort < 3:  # with 2, each site learns the other's update from the sum
            bad("min-secure-cohort", f"must be at least 3, got {self.min_secure_cohort}")
        for key, value in (("max-train-examples", self.max_train), ("max-eval-examples", self.max_eval)):
            if value < 0:
                bad(key, f"must be 0 or more, got {value}")
        if self.deployment:
            for key, value in (("data-path", self.data_path), ("ledger-dir", str(self.ledger_dir)),
                               ("test-data-path", self.test_data_path), ("shipped-dir", self.shipped_dir)):
                if value and not Path(value).is_absolute():
                    bad(key, f"must be an absolute path, got {value!r}")

    # ---- what the rest of the client reads -----------------------------------------
    def data_spec(self, request_config: dict, partition_id: int = 0, num_partitions: int = 1) -> DataSpec:
        """How to read this site's records: the task's fields from the request, the rest from the site."""
        spec = DataSpec.from_config(request_config)
        if not self.deployment:
            return spec
        return DataSpec(
            path=self.data_path, task=spec.task, prompt_field=spec.prompt_field, response_field=spec.response_field,
            text_field=spec.text_field, label_field=spec.label_field, verbalizers=spec.verbalizers,
            partition="iid", partition_by="", dirichlet_alpha=0.0, test_fraction=self.test_fraction,
            max_train=self.max_train, max_eval=self.max_eval, seed=0, split="record-hash",
            test_path=self.test_data_path)

    def model_name(self, request_config: dict) -> str:
        return self.model_dir or request_config["model.name"]

    def device_name(self, request_config: dict) -> str:
        """The site's device, else the run config's model.device (the hardware is the site's)."""
        return self.device or request_config["model.device"]

    def ignored_requests(self, run_config) -> list[str]:
        """Site-owned settings the coordinator's run config tried to set (logged, never applied)."""
        if not self.deployment:
            return []
        from slm.config import SCHEMA

        mine = {"data.path": self.data_path, "dp.max-epsilon": self.max_epsilon, "dp.delta": self.delta,
                "dp.enabled": True, "dp.noise-seed": -1, "dp.ledger-dir": str(self.ledger_dir)}
        found = []
        for key in SITE_OWNED:
            if key in run_config and run_config[key] != SCHEMA[key].default and run_config[key] != mine.get(key):
                found.append(f"{key}={run_config[key]!r}")
        return found


def _typed(where: str, key: str, value, kind: type):
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
