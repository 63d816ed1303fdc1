"""Phone profile benchmark: peak memory and eval-loss cost of LoRA on an int8 base.

``python -m simulation.bench.phone_memory [--steps N] [--json]`` runs the same client round
twice, each in a fresh process (peak resident memory is a per-process high-water mark):
load the base (``model.dtype`` float32, then int8), attach LoRA, train ``--steps`` DP-SGD
steps on one hospital client's records with a fixed noise seed, evaluate on its held-out
split. It prints each profile's peak RSS, the int8/fp32 ratio and the eval loss before
and after training.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROFILES = ("float32", "int8")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def client_round(dtype: str, steps: int, noise: float) -> dict:
    """One hospital client's round on a ``dtype`` base; what a phone would run."""
    import torch

    from client.data import DataSpec, load_local_data
    from client.train import train_adapter
    from slm.config import resolve
    from slm.evaluate import evaluate
    from slm.lora import LoraSpec, attach
    from slm.tasks import Task

    config = resolve({"model.name": "smollm2", "model.dtype": dtype, "data.partition": "natural",
                      "data.max-eval-examples": 0, "lora.dropout": 0.0})
    started = time.time()
    model, tokenizer = attach(config["model.name"], LoraSpec.from_config(config), dtype)
    peak = {"load": _peak_mb()}
    loaded = time.time() - started
    local = load_local_data(DataSpec.from_config(config), 0, 4)
    task = Task.from_config(config)
    before = evaluate(model, tokenizer, task, local.test)["eval_loss"]
    peak["eval"] = _peak_mb()
    started = time.time()
    torch.manual_seed(0)
    result = train_adapter(model, tokenizer, task, local.train, steps=steps, batch_size=config["train.batch-size"],
                           lr=config["train.lr"], noise_multiplier=noise, clip_norm=config["dp.clip-norm"], seed=0)
    trained = time.time() - started
    peak["train"] = _peak_mb()
    after = evaluate(model, tokenizer, task, local.test)["eval_loss"]
    return {"dtype": dtype, "client": local.name, "peak_rss_mb": _peak_mb(), "peak_rss_mb_by_stage": peak,
            "load_s": loaded, "train_s": trained, "train_loss": result.loss,
            "eval_loss_before": before, "eval_loss_after": after, "eval_examples": len(local.test)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="phone_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="DP-SGD steps (default 5, one hospital round)")
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier (fixed, seeded)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=PROFILES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(client_round(args.child, args.steps, args.noise)))
        return 0
    results = {}
    for dtype in PROFILES:
        out = subprocess.run([sys.executable, "-m", "simulation.bench.phone_memory", "--child", dtype,
                              "--steps", str(args.steps), "--noise", str(args.noise)],
                             check=True, capture_output=True, text=True).stdout
        results[dtype] = json.loads(out.strip().splitlines()[-1])
    fp32, int8 = results["float32"], results["int8"]
    summary = {"profiles": results, "peak_rss_ratio": int8["peak_rss_mb"] / fp32["peak_rss_mb"],
               "eval_loss_change_pct": 100 * (int8["eval_loss_after"] / fp32["eval_loss_after"] - 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"one client round ({fp32['client']}, {args.steps} DP-SGD steps, sigma {args.noise}), fresh process each")
    print("peak RSS (high-water mark) after each stage; eval loss on the client's held-out split")
    print(f"{'base':8s} {'load':>8s} {'eval':>8s} {'train':>8s} {'eval before':>12s} {'eval after':>11s} {'train s':>8s}")
    for r in results.values():
        by = r["peak_rss_mb_by_stage"]
        print(f"{r['dtype']:8s} {by['load']:6.0f}MB {by['eval']:6.0f}MB {by['train']:6.0f}MB "
              f"{r['eval_loss_before']:12.4f} {r['eval_loss_after']:11.4f} {r['train_s']:8.1f}")
    print(f"int8 / fp32 peak RSS: {summary['peak_rss_ratio']:.3f}x; eval loss after training: "
          f"{summary['eval_loss_change_pct']:+.2f}% vs the fp32 base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
