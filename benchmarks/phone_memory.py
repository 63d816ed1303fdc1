"""Phone memory: peak resident memory of one client round, by stage, per memory profile.

``python -m benchmarks phone-memory [--round dp|phone] [--profiles fp32,int8,phone] [--steps N]``
runs one client round per profile, each in a fresh process (peak resident memory is a
per-process high-water mark), and reports the peak of every stage of that round: imports
(torch, transformers, PEFT, Opacus and ours), model load (base + LoRA), data (records read
and encoded), evaluation, training, evaluation again. A stage's peak is the kernel's
high-water mark (``VmHWM``), reset to the current resident set at the start of each stage
(``/proc/self/clear_refs`` = 5); the process's peak is the largest of them (and equals
``ru_maxrss``, reported as a cross-check). Also the seconds per training step.

Rounds: ``dp`` = one hospital client (MedQuAD GARD, 225 records, instruction SFT, 128
tokens) with DP-SGD on (Opacus hooks, expected batch 8, sigma 1.0, fixed seed), as a
hospital client trains; ``phone`` = the phone scenario's own round (one Shakespeare user,
next-word, its keys). Profiles: ``fp32`` and ``int8`` are the bases alone (the levers
off), each lever is a profile of its own on top of int8, and ``phone`` is the phone
scenario's memory keys (simulation/scenarios.py), i.e. what a phone runs.

The client reads its own JSONL file, as a device does: the bench writes that client's
share of the shared file before the child starts, so no partitioner (and no ``datasets``)
runs in the measured process.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

STAGES = ("imports", "load", "data", "eval", "train", "eval again")


@dataclass(frozen=True)
class Profile:
    """The memory levers of one run, each a config key."""

    dtype: str = "float32"  # model.dtype
    return_memory: bool = False  # model.return-freed-memory
    physical_batch: int = 0  # train.physical-batch-size (0 = the whole Poisson batch at once)
    recompute: bool = False  # train.recompute


def phone_profile() -> Profile:
    """The levers the phone scenario ships with."""
    from simulation.scenarios import get_scenario

    keys = get_scenario("phone").overrides
    return Profile(dtype=keys["model.dtype"], return_memory=keys["model.return-freed-memory"],
                   physical_batch=keys["train.physical-batch-size"], recompute=keys["train.recompute"])


INT8 = Profile(dtype="int8")
PROFILES = {
    "fp32": lambda: Profile(dtype="float32"),
    "int8": lambda: INT8,
    "int8+return": lambda: replace(INT8, return_memory=True),
    "int8+micro1": lambda: replace(INT8, physical_batch=1),
    "int8+recompute": lambda: replace(INT8, recompute=True),
    "int8+return+micro1": lambda: replace(INT8, return_memory=True, physical_batch=1),
    "int8+return+micro2+recompute": lambda: replace(INT8, return_memory=True, physical_batch=2, recompute=True),
    "phone": phone_profile,
}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1)) / 1024


class StagePeaks:
    """High-water mark of the resident set per stage (Linux: reset through /proc/self/clear_refs)."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.resident: dict[str, dict[str, float]] = {}  # at the end of each stage: anonymous / file-backed

    def mark(self, stage: str) -> None:
        self.peaks[stage] = _status_mb("VmHWM")
        self.resident[stage] = {"anon": _status_mb("RssAnon"), "file": _status_mb("RssFile")}
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := the current resident set


def _round_config(name: str, profile: Profile) -> tuple[dict, dict]:
    """(resolved config, training options) of the round ``name``, reading the shared file."""
    from fedslm.common.config import resolve
    from simulation.scenarios import DEMO_DATA, get_scenario

    if name == "dp":
        config = resolve({"model.name": "smollm2", "data.path": str(DEMO_DATA), "model.dtype": profile.dtype,
                          "data.partition": "natural", "data.max-eval-examples": 0, "lora.dropout": 0.0})
        return config, {"clients": 4, "noise": 1.0}
    scenario = get_scenario("phone")
    keys = {k: v for k, v in scenario.overrides.items() if k in _schema()}
    config = resolve({"model.dtype": profile.dtype}, base=keys)
    return config, {"clients": scenario.clients, "noise": None}  # sample-level DP off: user-level DP on the server


def _schema() -> dict:
    from fedslm.common.vocabulary import SCHEMA

    return SCHEMA


def write_client_file(round_name: str, path: str) -> str:
    """Client 0's share of the round's shared file, as that client's own JSONL file (in the parent)."""
    from client.data import DataSpec, partition
    from client.records import read_table
    config, options = _round_config(round_name, Profile())
    spec = DataSpec.from_config(config)
    rows = partition(read_table(spec.path), spec, 0, options["clients"])
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def client_round(round_name: str, profile: Profile, steps: int, data_file: str) -> dict:
    """One client's round (load, data, eval, train, eval) with ``profile``'s levers, peaks by stage."""
    stages = StagePeaks()
    from client.data import DataSpec, load_local_data
    from client.train import train_adapter
    from slm.allocator import return_freed_memory, trim_freed_memory
    from slm.evaluate import evaluate
    from slm.lora import LoraSpec, attach
    from slm.recompute import recomputed_layers
    from slm.tasks import Task

    stages.mark("imports")
    config, options = _round_config(round_name, profile)
    if profile.return_memory:  # where the ClientApp does it: before the base is loaded
        return_freed_memory()
    started = time.time()
    model, tokenizer = attach(config["model.name"], LoraSpec.from_config(config), profile.dtype)
    load_s = time.time() - started
    stages.mark("load")
    local = load_local_data(DataSpec.from_config({**config, "data.path": data_file}), 0, 1)
    task = Task.from_config(config)
    stages.mark("data")
    before = evaluate(model, tokenizer, task, local.test)
    stages.mark("eval")
    started = time.time()
    with recomputed_layers(model, profile.recompute):
        result = train_adapter(model, tokenizer, task, local.train, steps=steps, batch_size=config["train.batch-size"],
                               lr=config["train.lr"], noise_multiplier=options["noise"],
                               clip_norm=config["dp.clip-norm"], seed=0, physical_batch_size=profile.physical_batch)
    train_s = time.time() - started
    if profile.return_memory:  # where the ClientApp does it: after training, before the evaluation
        trim_freed_memory()
    stages.mark("train")
    after = evaluate(model, tokenizer, task, local.test)
    stages.mark("eval again")
    return {"round": round_name, "profile": asdict(profile), "client": local.name, "steps": steps,
            "batch": config["train.batch-size"], "examples_seen": result.examples_seen,
            "peak_mb_by_stage": stages.peaks, "peak_mb": max(stages.peaks.values()),
            "resident_mb_after_stage": stages.resident,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_s": load_s, "step_s": train_s / steps, "eval_loss_before": before["eval_loss"],
            "eval_loss_after": after["eval_loss"]}


def run(round_name: str = "dp", profiles=("fp32", "int8", "phone"), steps: int = 3) -> list[dict]:
    """Each profile's round in a fresh process; printed as a table."""
    import tempfile

    results = []
    directory = tempfile.TemporaryDirectory(prefix="fedslm-phone-memory-")
    data_file = write_client_file(round_name, f"{directory.name}/client.jsonl")
    for name in profiles:
        if name not in PROFILES:
            from fedslm.common.errors import UserError

            raise UserError(f"python -m benchmarks phone-memory --profiles: unknown profile {name!r} "
                            f"(choose from {', '.join(PROFILES)})")
        out = subprocess.run([sys.executable, "-m", "benchmarks.phone_memory", round_name, name, str(steps),
                              data_file],
                             check=True, capture_output=True, text=True).stdout
        results.append({"name": name, **json.loads(out.strip().splitlines()[-1])})
        _print_row(results[-1], header=len(results) == 1)
    directory.cleanup()
    return results


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"round {r['round']} ({r['client']}, {r['steps']} steps, expected batch {r['batch']}), fresh process "
              "per profile; peak resident MiB per stage")
        print(f"{'profile':15s}" + "".join(f"{s:>11s}" for s in STAGES) + f"{'peak':>8s}{'s/step':>8s}"
              f"{'eval before':>12s}{'after':>8s}")
    by = r["peak_mb_by_stage"]
    print(f"{r['name']:15s}" + "".join(f"{by[s]:11.0f}" for s in STAGES) + f"{r['peak_mb']:8.0f}{r['step_s']:8.1f}"
          f"{r['eval_loss_before']:12.4f}{r['eval_loss_after']:8.4f}", flush=True)


if __name__ == "__main__":  # the child: python -m benchmarks.phone_memory ROUND PROFILE STEPS FILE
    round_arg, profile_arg, steps_arg, file_arg = sys.argv[1:5]
    print(json.dumps(client_round(round_arg, PROFILES[profile_arg](), int(steps_arg), file_arg)))
