"""Simulation overhead: a federated run's wall time against the pure compute of the same work.

The federation (``fedslm simulate``: Flower simulation engine, Ray worker, messages,
ledgers, checkpoints, run directory) runs first; then this process repeats the same
work without any of it: the same clients' records, the same DP-SGD steps (train_adapter,
same steps, batch, sigma) and the same evaluations, on one model loaded once. The
ratio of the two is the price of the federation machinery. It is printed three ways: over
the whole command (start-up included: Ray, a model load in the worker and one in the
server), over the rounds alone (the round seconds recorded in metrics.jsonl; round 0,
the first evaluation, includes the worker's model load), and over the training rounds
(1..R: the steady state of a long run, where start-up and loading are amortised).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.measure import simulate, table
from client.data import DataSpec, load_local_data
from client.train import train_adapter
from fedslm.common.config import resolve
from privacy.mechanism.randomness import round_key
from simulation.scenarios import DEMO_DATA
from slm.evaluate import evaluate
from slm.lora import LoraSpec, adapter_state, attach, frozen_a_factors, set_adapter_state
from slm.tasks import Task


def settings(model: str, steps: int, batch: int, length: int) -> dict:
    return {"model.name": model, "data.path": str(DEMO_DATA), "model.max-length": length,
            "train.local-steps": steps, "train.batch-size": batch,
            "data.max-train-examples": 64, "data.max-eval-examples": 16, "dp.enabled": True,
            "dp.noise-multiplier": 1.0, "dp.target-epsilon": 0.0, "dp.max-epsilon": 1000.0,
            "dp.noise-seed": 0,  # the same Poisson batches on both sides (a benchmark: nothing private here)
            "server.aggregation": "ffa", "server.min-clients": 1, "lora.dropout": 0.0}


def pure_compute(config: dict, clients: int, rounds: int, run_id: str) -> tuple[float, float]:
    """Seconds for the same evaluation (round 0) and training rounds, in this process, with no federation."""
    spec = DataSpec.from_config(config)
    locals_ = [load_local_data(spec, i, clients) for i in range(clients)]
    model, tokenizer = attach(config["model.name"], LoraSpec.from_config(config), config["model.dtype"])
    started = time.perf_counter()  # loading is not compute: the federation's loads count as its overhead
    task = Task.from_config(config)
    initial = adapter_state(model)
    for local in locals_:  # round 0
        evaluate(model, tokenizer, task, local.test)
    round_zero = time.perf_counter() - started
    for server_round in range(1, rounds + 1):
        for local in locals_:
            set_adapter_state(model, initial)
            with frozen_a_factors(model, freeze=True):
                train_adapter(model, tokenizer, task, local.train, steps=config["train.local-steps"],
                              batch_size=config["train.batch-size"], lr=config["train.lr"], noise_multiplier=1.0,
                              clip_norm=config["dp.clip-norm"],
                              seed=round_key(config["dp.noise-seed"], local.name, run_id, server_round),
                              grad_sample_mode=config["train.grad-sample-mode"], autocast=config["train.autocast"])
        for local in locals_:
            evaluate(model, tokenizer, task, local.test)
    return round_zero, time.perf_counter() - started - round_zero


def run(model: str = "smollm2", clients: int = 2, rounds: int = 2, steps: int = 8, batch: int = 8, length: int = 128,
        out: Path | None = None) -> dict:
    root = Path(out or tempfile.mkdtemp(prefix="fedslm-bench-overhead-"))
    overrides = settings(model, steps, batch, length)
    fed = simulate("tiny", root / "federated", clients, overrides, rounds)
    config = resolve(json.loads((fed.out / "config.json").read_text()))
    pure_zero, pure_rounds = pure_compute(config, clients, rounds, run_id=fed.out.name)
    pure = pure_zero + pure_rounds
    rounds_fed = [r for r in fed.rows if "shipped" not in r]
    fed_rounds = sum(r["seconds"] for r in rounds_fed)
    fed_training = sum(r["seconds"] for r in rounds_fed if r["round"] > 0)
    result = {"model": model, "clients": clients, "rounds": rounds, "steps/client/round": steps, "B": batch,
              "T": length, "federated wall s": fed.wall, "federated rounds s": fed_rounds,
              "federated rounds 1.. s": fed_training, "pure compute s": pure, "pure rounds 1.. s": pure_rounds,
              "x wall": fed.wall / pure, "x rounds": fed_rounds / pure, "x rounds 1..": fed_training / pure_rounds}
    print("Simulation overhead (federated run vs the same training + evaluation in one process):")
    print(table(list(result), [list(result.values())]))
    return result
