"""A DP-LoRA federation in one process, for recipe sweeps on a machine without Flower or Ray (a GPU).

Two halves, because partitioning needs flwr-datasets and a lent GPU machine has none:

``prepare`` (where fedslm is installed) resolves a task's run config as ``fedslm simulate`` does
(simulation.preflight: the file checked, verbalizers resolved, window and label list fitted to
the training records) and writes it with every site's training and held-out records to one JSON.

``sweep`` (torch, transformers, peft, opacus and cryptography only) runs each recipe the way the
federation does: every round each site starts from the global adapter and takes ``steps``
DP-SGD steps with client.train.train_adapter (Poisson sampling, per-example clipping, ChaCha20
Gaussian noise), at the sigma its own accountant calibrates (privacy.mechanism.calibrate, PRV,
delta = min(1e-5, 0.1 / records)) so that its epsilon over all the recipe's rounds is the
recipe's; the server averages what the sites send (server.aggregate: ffa = the B factors, A
shared and frozen; fedavg = both factors), weighted by training records. The held-out records
of all sites are scored after every round (a label task: accuracy by the label scorer; sft: the
eval loss). Left out of the product: Flower's messaging, ledgers, secure aggregation and the
sites' policy checks, none of which changes an update.

A recipe is ``key=value`` pairs joined by ``;`` (keys: the fields of ``Recipe``), e.g.
``rounds=3;steps=16;batch=32;lr=3e-3``; ``epsilon=inf`` trains without DP.

    python benchmarks/federation.py prepare --task medquad-qtype --out qtype.json
    python benchmarks/federation.py sweep qtype.json --device cuda "steps=8" "steps=16;batch=16"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from benchmarks.pairs import parse_pairs  # noqa: E402
from fedslm.common.errors import UserError  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    rounds: int = 3
    steps: int = 5  # DP-SGD steps per site per round
    batch: int = 8  # expected (Poisson) batch
    lr: float = 1e-2
    schedule: str = "constant"  # the lr over rounds: constant | cosine | linear (round r of R gets lr x f(r))
    clip: float = 0.1
    rank: int = 8
    targets: str = "q_proj,v_proj"
    aggregation: str = "ffa"  # ffa | fedavg
    optimizer: str = "adam"  # adam | adam-bc
    epsilon: float = 8.0  # per site over all rounds; inf = no DP
    seed: int = 0  # the sites' noise and sampling draws (reproducible: a benchmark, not a deployment)

    @classmethod
    def parse(cls, text: str) -> Recipe:
        recipe = parse_pairs(cls, text, "benchmarks/federation.py sweep")
        if recipe.aggregation not in ("ffa", "fedavg"):
            raise UserError(f"benchmarks/federation.py sweep: {text!r}: aggregation must be ffa or fedavg")
        if recipe.schedule not in SCHEDULES:
            raise UserError(f"benchmarks/federation.py sweep: {text!r}: schedule must be one of {', '.join(SCHEDULES)}")
        return recipe

    def lr_at(self, round_number: int) -> float:
        """Round ``round_number``'s (1-based) learning rate: a fresh Adam per site per round, as in the
        product, so a schedule can only act across rounds. Cosine and linear decay from ``lr`` in round 1
        towards 0 after the last (cosine: 1, 0.75, 0.25 of lr over 3 rounds; linear: 1, 2/3, 1/3)."""
        done = (round_number - 1) / self.rounds
        return self.lr * SCHEDULES[self.schedule](done)


SCHEDULES = {"constant": lambda done: 1.0, "cosine": lambda done: 0.5 * (1 + math.cos(math.pi * done)),
             "linear": lambda done: 1.0 - done}


def prepare(task: str, out: Path, *, clients: int = 4, max_train: int = 0, model: str = "smollm2") -> dict:
    """Resolve ``task`` (benchmarks.privacy_utility.task_config) and write config + sites to ``out``."""
    from benchmarks.privacy_utility import task_config
    from fedslm.common.config import resolve
    from simulation.preflight import check_data, fit_window
    from simulation.scenarios import get_scenario
    from slm.tokenizer import load_tokenizer

    settings = {**task_config(task, out.parent), "model.name": model, "data.max-train-examples": max_train,
                "data.max-eval-examples": 0}
    config = resolve(settings, get_scenario("hospital").overrides)
    sites = check_data(config, clients)
    fit_window(config, sites, load_tokenizer(model))
    prepared = {"task": task, "config": config,
                "sites": [{"name": s.name, "train": list(s.train), "test": list(s.test)} for s in sites]}
    out.write_text(json.dumps(prepared))
    return prepared


class Federation:
    """One task's model, encoded records and round-0 score, shared by every recipe of a sweep."""

    def __init__(self, prepared: dict, *, device: str, autocast: str, physical: int):
        self.prepared, self.device, self.autocast, self.physical = prepared, device, autocast, physical
        self._encoded: dict[tuple, list] = {}

    def _model(self, recipe: Recipe):
        from slm.base import resolve_device
        from slm.lora import LoraSpec, adapter_state, attach
        from slm.tasks import Task

        config = {**self.prepared["config"], "lora.r": recipe.rank, "lora.alpha": 2 * recipe.rank,
                  "lora.target-modules": recipe.targets, "lora.dropout": 0.0}
        model, tokenizer = attach(config["model.name"], LoraSpec.from_config(config),
                                  device=resolve_device(self.device))
        if not hasattr(model, "_fedslm_start"):
            model._fedslm_start = adapter_state(model)
        return model, tokenizer, Task.from_config(config)

    def _sites(self, task, tokenizer) -> list[list]:
        from slm.tasks import encode

        if "sites" not in self._encoded:
            self._encoded["sites"] = [[encode(task, tokenizer, r, where=f"{s['name']} #{i}")
                                       for i, r in enumerate(s["train"])] for s in self.prepared["sites"]]
        return self._encoded["sites"]

    def score(self, model, tokenizer, task) -> dict:
        from slm.evaluate import evaluate

        held = [r for s in self.prepared["sites"] for r in s["test"]]
        started = time.perf_counter()
        metrics = evaluate(model, tokenizer, task, held, batch_size=64 if self.device.startswith("cuda") else 8)
        row = {"eval_loss": metrics["eval_loss"], "eval_s": time.perf_counter() - started, "held_out": len(held)}
        if "accuracy" in metrics:
            row["accuracy"] = metrics["accuracy"]
            row["stderr"] = math.sqrt(metrics["accuracy"] * (1 - metrics["accuracy"]) / len(held))
        return row

    def run(self, recipe: Recipe, *, every_round: bool = True) -> dict:
        from client.adam_bc import optimizer_for
        from client.train import train_adapter
        from client.units import sample_rate
        from privacy.mechanism.calibrate import noise_for_budget
        from privacy.mechanism.policy import default_delta
        from server.aggregate import aggregate
        from slm.lora import a_factor_digest, adapter_state, frozen_a_factors, sent_tensors, set_adapter_state

        model, tokenizer, task = self._model(recipe)
        sites = self._sites(task, tokenizer)
        private = not math.isinf(recipe.epsilon)
        sigmas = [noise_for_budget([], budget=recipe.epsilon, sample_rate=sample_rate(recipe.batch, len(train)),
                                   steps_per_round=recipe.steps, rounds_left=recipe.rounds,
                                   delta=default_delta(len(train))) if private else None for train in sites]
        if private and None in sigmas:
            raise ValueError(f"{recipe}: a site's budget does not fit even the largest sigma")
        state = dict(model._fedslm_start)
        rounds, started = [], time.perf_counter()
        for number in range(1, recipe.rounds + 1):
            sent, losses, lr = [], [], recipe.lr_at(number)
            for k, train in enumerate(sites):
                set_adapter_state(model, state)
                with frozen_a_factors(model, recipe.aggregation == "ffa"):
                    result = train_adapter(
                        model, tokenizer, task, train, steps=recipe.steps, batch_size=recipe.batch, lr=lr,
                        noise_multiplier=sigmas[k], clip_norm=recipe.clip, seed=_seed(recipe, number, k),
                        make_optimizer=optimizer_for(recipe.optimizer, lr, sigmas[k], recipe.clip,
                                                     recipe.batch),
                        autocast=self.autocast, physical_batch_size=self.physical)
                sent.append(sent_tensors(adapter_state(model), recipe.aggregation))
                losses.append(result.loss)
            state = {**state, **aggregate(recipe.aggregation, sent, [len(t) for t in sites])}
            row = {"round": number, "lr": lr, "train_loss": sum(losses) / len(losses),
                   "train_s": time.perf_counter() - started}
            if every_round or number == recipe.rounds:
                set_adapter_state(model, state)
                row.update(self.score(model, tokenizer, task))
            rounds.append(row)
        set_adapter_state(model, model._fedslm_start)
        return {"recipe": asdict(recipe), "sigmas": sigmas, "records": [len(t) for t in sites],
                "examples": recipe.rounds * recipe.steps * recipe.batch * len(sites), "rounds": rounds,
                "a_digest": a_factor_digest(state), "start_a_digest": a_factor_digest(model._fedslm_start)}

    def untrained(self) -> dict:
        model, tokenizer, task = self._model(Recipe())
        return self.score(model, tokenizer, task)


def _seed(recipe: Recipe, round_number: int, site: int) -> int:
    """A distinct, reproducible draw per (recipe seed, round, site)."""
    text = f"{recipe.seed}/{round_number}/{site}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def sweep(prepared_path: Path, recipes: list[str], *, device: str = "auto", autocast: str = "none",
          physical: int = 8, out: Path | None = None, deadline_s: float = 0.0, every_round: bool = True,
          untrained: bool = True) -> list[dict]:
    """Every recipe in order (all parsed first), one JSON line each (also appended to ``out``);
    recipes not begun ``deadline_s`` after the start are skipped, and said so."""
    parsed = [Recipe.parse(r) for r in recipes]
    prepared = json.loads(prepared_path.read_text())
    federation = Federation(prepared, device=device, autocast=autocast, physical=physical)
    began = time.perf_counter()
    results = []
    if untrained:
        results.append({"task": prepared["task"], "text": "untrained", **federation.untrained()})
        _emit(results[0], out)
    for text, recipe in zip(recipes, parsed):
        if deadline_s and time.perf_counter() - began > deadline_s:
            results.append({"task": prepared["task"], "text": text, "skipped": "deadline"})
        else:
            results.append({"task": prepared["task"], "text": text, **federation.run(recipe, every_round=every_round)})
        _emit(results[-1], out)
    return results


def _emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with out.open("a") as handle:
            handle.write(line + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="resolve a task and write its config and sites to one JSON")
    p.add_argument("--task", required=True, help="a task of benchmarks/privacy_utility.py (sst2-dev, medquad, ...)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-train", type=int, default=0, help="training records per site (0 = all)")
    p.add_argument("--model", default="smollm2")
    s = commands.add_parser("sweep", help="run recipes on a prepared task, one JSON line each")
    s.add_argument("prepared", type=Path)
    s.add_argument("recipes", nargs="+")
    s.add_argument("--device", default="auto")
    s.add_argument("--autocast", default="none", choices=("none", "bf16"))
    s.add_argument("--physical", type=int, default=8, help="examples per forward/backward pass (0 = the whole batch)")
    s.add_argument("--out", type=Path, help="append the JSON lines here too")
    s.add_argument("--deadline-s", type=float, default=0.0, help="skip recipes not begun by then (0 = none)")
    s.add_argument("--final-only", action="store_true", help="score after the last round only")
    s.add_argument("--no-untrained", action="store_true", help="skip scoring the untrained model first")
    args = parser.parse_args(argv)
    from slm.quiet import quiet_libraries

    quiet_libraries()
    if args.command == "prepare":
        prepared = prepare(args.task, args.out, clients=args.clients, max_train=args.max_train, model=args.model)
        print(json.dumps({"task": args.task, "window": prepared["config"]["model.max-length"],
                          "label_list": prepared["config"]["data.label-list"],
                          "sites": {s["name"]: [len(s["train"]), len(s["test"])] for s in prepared["sites"]}}))
        return 0
    sweep(args.prepared, args.recipes, device=args.device, autocast=args.autocast, physical=args.physical,
          out=args.out, deadline_s=args.deadline_s, every_round=not args.final_only,
          untrained=not args.no_untrained)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
