"""Quantization retention: what the shipped GGUF files keep of the fine-tuned model.

``python -m benchmarks quant RUN_DIR`` (or ``python -m benchmarks.quant RUN_DIR``) merges the
run's last (or ``--round``) adapter, exports F16 / Q8_0 / Q4_0 exactly as shipping does
(server.ship.build_artifacts, into RUN_DIR/bench-quant/), loads each file the way a client
does (transformers with ``gguf_file=``, dequantized) and evaluates it on the held-out
splits of all the run's clients, next to the fp32 merged model. It prints bytes, size
ratio to the fp32 merged directory, eval loss, change vs fp32 and whether the issue's
targets are met (Q8_0 <= 0.27x and <= +1%, Q4_0 <= 0.16x and <= +5%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TARGETS = {"q8_0": (0.27, 1.0), "q4_0": (0.16, 5.0)}  # (size vs fp32, eval-loss change in %)


def held_out_records(config: dict, clients: int, max_eval: int) -> list[dict]:
    """Every client's test split (the records no client trained on)."""
    from client.data import DataSpec, load_local_data

    spec = DataSpec.from_config({**config, "data.max-eval-examples": max_eval})
    return [r for p in range(clients) for r in load_local_data(spec, p, clients).test]


def run_clients(run_dir: Path) -> int:
    from fedslm.common.jsonfiles import read_json

    setup = run_dir / "simulation.json"
    if setup.is_file():
        return int(read_json(setup, "simulation file")["clients"])
    return 4


def measure(run_dir: Path, server_round: int | None, quants: list[str], clients: int, max_eval: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fedslm.common.config import resolve
    from fedslm.common.jsonfiles import read_json
    from fedslm.common.vocabulary import RunConfig
    from server.ship import build_artifacts
    from slm.evaluate import evaluate
    from slm.tasks import Task

    config = read_json(run_dir / "config.json", "run config")
    if server_round is None:
        rounds = sorted(int(p.name.split("-")[1]) for p in (run_dir / "adapters").glob("round-*"))
        server_round = rounds[-1]
    out = run_dir / "bench-quant"
    started = time.time()
    artifacts = build_artifacts(run_dir, RunConfig.parse(resolve(config)), server_round, quants, out=out)
    export_s = time.time() - started
    records = held_out_records(config, clients, max_eval)
    task = Task.from_config(config)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32, local_files_only=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged", local_files_only=True)
    fp32_bytes = sum(p.stat().st_size for p in (out / "merged").iterdir() if p.name != "manifest.json")
    rows = [{"format": "fp32", "bytes": fp32_bytes, "ratio": 1.0, **evaluate(merged, tokenizer, task, records)}]
    del merged
    for artifact in artifacts:
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=artifact.path.name, dtype=torch.float32,
                                                     local_files_only=True)
        rows.append({"format": artifact.quant, "bytes": artifact.bytes, "ratio": artifact.bytes / fp32_bytes,
                     **evaluate(model, tokenizer, task, records)})
        del model
    base = rows[0]["eval_loss"]
    for row in rows:
        row["change_pct"] = 100 * (row["eval_loss"] / base - 1)
        size_target, loss_target = TARGETS.get(row["format"], (None, None))
        row["target"] = None if size_target is None else f"<= {size_target}x, <= +{loss_target}%"
        row["met"] = None if size_target is None else (row["ratio"] <= size_target and row["change_pct"] <= loss_target)
    return {"run": str(run_dir), "round": server_round, "clients": clients, "eval_examples": len(records),
            "eval_tokens": rows[0]["eval_tokens"], "export_s": export_s, "rows": rows}


def render(result: dict) -> str:
    lines = [f"run {result['run']} round {result['round']}: {result['eval_examples']} held-out records of "
             f"{result['clients']} clients ({result['eval_tokens']:.0f} answer tokens); export {result['export_s']:.0f}s",
             f"{'format':7s} {'bytes':>12s} {'vs fp32':>8s} {'eval loss':>10s} {'change':>8s}  target",]
    for row in result["rows"]:
        met = "" if row["met"] is None else f"{row['target']}: {'met' if row['met'] else 'MISSED'}"
        lines.append(f"{row['format']:7s} {row['bytes']:12,d} {row['ratio']:7.3f}x {row['eval_loss']:10.4f} "
                     f"{row['change_pct']:+7.2f}%  {met}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--round", type=int, help="adapter round (default: the last)")
    parser.add_argument("--quant", default="f16,q8_0,q4_0")
    parser.add_argument("--clients", type=int, help="clients whose test splits to use (default: simulation.json, else 4)")
    parser.add_argument("--max-eval", type=int, default=0, help="cap per client (0 = the whole test split)")


def run(args) -> dict:
    """Measure, print the table, return the results (``python -m benchmarks quant`` and ``main``)."""
    from fedslm.common.errors import UserError
    from server.ship import parse_quants

    if not (args.run_dir / "config.json").is_file():
        raise UserError(f"run directory {args.run_dir}: no config.json")
    result = measure(args.run_dir, args.round, parse_quants(args.quant), args.clients or run_clients(args.run_dir),
                     args.max_eval)
    print(render(result))
    return result


def main(argv=None) -> int:
    from fedslm.common.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except UserError as err:
        print(f"fedslm: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
