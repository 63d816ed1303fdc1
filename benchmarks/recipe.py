"""Recipe sweep: which DP-SGD settings make the most of a fixed compute budget.

``sst2``: one client's DP-SGD on its share of SST-2 train (``--records`` sentences, the
first of the shared train.tsv), evaluated on the whole SST-2 dev set (872 sentences) with
the label scorer. ``medquad``: one hospital (GARD, the packaged excerpt's first
institute, 225 training records, instruction SFT at 128 tokens), evaluated on the held-out
records of all 4 institutes (100) by eval loss. Every point processes the same number of examples (``--budget`` = steps x
expected batch, so a larger batch takes fewer steps) and is calibrated to the same
(epsilon, delta) with the client's own accountant (PRV, delta = min(1e-5, 0.1 / records));
what changes between points is expected batch, clip norm, learning rate, optimizer, rank,
target modules and how many top layers carry adapters (``lora.layers``: the layers below
run once per record, slm/frozen_prefix.py). Each point reports dev accuracy with its
standard error sqrt(p (1 - p) / 872) and its wall time, so equal examples at unequal cost
(an all-layer adapter runs 30 layers backward, a top-4 one 4) stay visible.

A point is ``key=value`` pairs joined by ``;``, e.g. ``batch=64;clip=0.1;lr=5e-3;layers=4``
(keys: batch, clip, lr, optimizer adam|sgd, rank, layers, targets, autocast, ffa 0|1, noise dp|clip|none).
``noise`` separates what DP-SGD's two halves do to utility: ``dp`` = clipping and the noise
calibrated to ``--epsilon``; ``clip`` = the same per-example clipping with sigma 0 (no
privacy at all: a diagnostic); ``none`` = plain training, neither. The sweep
runs in one process: points with the same adapter shape share the model and its kept
frozen-layer outputs, so only the first of them pays for the layers below the adapters.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass

from benchmarks.pairs import parse_pairs
from benchmarks.privacy_utility import shared_file
from fedslm.common.errors import UserError
from simulation.scenarios import DEMO_DATA

NOISE = ("dp", "clip", "none")


@dataclass(frozen=True)
class Point:
    batch: int = 64
    clip: float = 0.1
    lr: float = 5e-3
    optimizer: str = "adam"
    rank: int = 8
    layers: int = 0
    targets: str = "q_proj,v_proj"
    autocast: str = "none"
    ffa: int = 0  # 1 = only the B factors train (FFA-LoRA, what a DP federation aggregates); 0 = A and B
    noise: str = "dp"  # dp | clip (sigma 0, clipping kept: no privacy) | none (plain training)

    @classmethod
    def parse(cls, text: str) -> "Point":
        point = parse_pairs(cls, text, "python -m benchmarks recipe --points")
        if point.noise not in NOISE:
            raise UserError(f"python -m benchmarks recipe --points: noise={point.noise!r} is not one of {', '.join(NOISE)}")
        return point


def sst2(relative: str, limit: int = 0) -> list[dict]:
    """SST-2 rows (sentence, label) from the shared data folder; never copied into the project."""
    with shared_file(relative).open(newline="") as handle:
        rows = [{"sentence": r["sentence"].strip(), "label": r["label"].strip()}
                for r in csv.DictReader(handle, delimiter="\t")]
    return rows[:limit] if limit else rows


def _optimizer(name: str, lr: float):
    import torch

    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise UserError(f"python -m benchmarks recipe: optimizer {name!r} is not adam or sgd")


TASK_KEYS = {
    "sst2": {"data.task": "label", "data.text-field": "sentence", "data.verbalizers": "0=negative,1=positive"},
    "medquad": {"data.task": "sft", "data.path": str(DEMO_DATA), "data.partition": "natural",
                "data.partition-by": "source"},
}


def task_records(task: str, records: int, dev_records: int) -> tuple[list[dict], list[dict]]:
    """(one client's training records, the evaluation records) of a task."""
    if task == "sst2":
        return sst2("sst2/train.tsv", records), sst2("sst2/dev.tsv", dev_records)
    if task == "medquad":
        from client.data import DataSpec, load_local_data
        from fedslm.common.config import resolve

        spec = DataSpec.from_config(resolve({**TASK_KEYS[task], "data.max-eval-examples": 0}))
        shares = [load_local_data(spec, i, 4) for i in range(4)]
        held = [r for share in shares for r in share.test]
        return shares[0].train[: records or None], held[: dev_records or None]
    raise UserError(f"python -m benchmarks recipe --task: {task!r} is not sst2 or medquad")


def run_point(point: Point, train: list[dict], dev: list[dict], *, budget: int, epsilon: float, length: int,
              model_name: str = "smollm2", seed: int = 0, task: str = "sst2", device: str = "auto") -> dict:
    """Train one client's adapter from the initial one at ``point`` and score it on ``dev``
    (``budget`` 0: no training, the untrained model's score)."""
    from client.train import train_adapter
    from fedslm.common.config import resolve
    from privacy.mechanism.calibrate import noise_for_budget
    from privacy.mechanism.policy import default_delta
    from slm.base import resolve_device
    from slm.evaluate import evaluate
    from slm.lora import LoraSpec, adapter_state, attach, frozen_a_factors, set_adapter_state
    from slm.tasks import Task

    config = resolve({**TASK_KEYS[task], "model.name": model_name, "model.max-length": length,
                      "lora.r": point.rank, "lora.alpha": 2 * point.rank, "lora.layers": point.layers,
                      "lora.target-modules": point.targets, "lora.dropout": 0.0})
    model, tokenizer = attach(model_name, LoraSpec.from_config(config), device=resolve_device(device))
    if not hasattr(model, "_fedslm_recipe_start"):
        model._fedslm_recipe_start = adapter_state(model)
    set_adapter_state(model, model._fedslm_recipe_start)
    encoding = Task.from_config(config)
    steps = budget // point.batch
    q, delta = point.batch / len(train), default_delta(len(train))
    private = point.noise == "dp" and not math.isinf(epsilon)
    sigma = noise_for_budget([], budget=epsilon, sample_rate=q, steps_per_round=steps, rounds_left=1,
                             delta=delta) if private else (0.0 if point.noise == "clip" else None)
    epsilon = epsilon if private else math.inf
    started = time.perf_counter()
    with frozen_a_factors(model, bool(point.ffa)):
        result = None if not steps else train_adapter(
            model, tokenizer, encoding, train, steps=steps, batch_size=point.batch, lr=point.lr,
            noise_multiplier=sigma, clip_norm=point.clip, seed=seed, make_optimizer=_optimizer(point.optimizer, point.lr),
            autocast=point.autocast, physical_batch_size=64)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, encoding, dev, batch_size=16)
    accuracy = metrics.get("accuracy", math.nan)
    return {**point.__dict__, "steps": steps, "sigma": sigma, "epsilon": epsilon, "delta": delta,
            "accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / len(dev)),
            "eval_loss": metrics["eval_loss"], "train_loss": result.loss if result else None, "train_s": train_s,
            "eval_s": time.perf_counter() - started}


def _row(name: str, r: dict) -> str:
    """One printed point; an SFT task has no accuracy (its metric is the eval loss)."""
    sigma = "-" if r["sigma"] is None else f"{r['sigma']:.2f}"
    accuracy = (f"{'-':>8s}{'-':>6s}" if math.isnan(r["accuracy"])
                else f"{100 * r['accuracy']:7.1f}%{100 * r['stderr']:6.1f}")
    return f"{name:58s}{r['steps']:6d}{sigma:>7s}{accuracy}{r['eval_loss']:8.3f}{r['train_s']:9.0f}{r['eval_s']:8.0f}"


def run(points: list[str], *, records: int = 2000, budget: int = 4096, epsilon: float = 8.0, length: int = 64,
        model: str = "smollm2", dev_records: int = 0, task: str = "sst2", device: str = "auto") -> list[dict]:
    parsed = [Point.parse(p) for p in points]  # every point checked before the first trains
    train, dev = task_records(task, records, dev_records)
    print(f"recipe sweep: {task}, one client of {len(train)} train records, {len(dev)} eval records, "
          f"{budget} examples per point, eps {epsilon:g}", flush=True)
    print(f"{'point':58s}{'steps':>6s}{'sigma':>7s}{'acc':>8s}{'+-':>6s}{'loss':>8s}{'train s':>9s}{'eval s':>8s}")
    results = []
    options = dict(length=length, model_name=model, task=task, device=device)
    base = run_point(parsed[0], train, dev, budget=0, epsilon=math.inf, **options)
    print(_row("untrained (round 0)", base), flush=True)
    for text, point in zip(points, parsed):
        r = run_point(point, train, dev, budget=budget, epsilon=epsilon, **options)
        print(_row(text, r), flush=True)
        results.append({"point": text, **r})
    return [{"point": "untrained", **base}, *results]
