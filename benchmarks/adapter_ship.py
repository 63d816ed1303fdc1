"""Adapter shipping: bytes per device per update, and how much of the gain the device's quantized base keeps.

For a finished run (default: the hospital demo's) this exports, exactly as shipping does
(server.ship), the untrained base as the devices' Q8_0 / Q4_0 GGUF bases and the last
(or ``--round``) global adapter as a llama.cpp LoRA GGUF; then, as a device does
(client.shipment), loads each base GGUF with transformers, applies the adapter read
back from its file, and evaluates on the run's held-out records (client.data, as in the
run). Retained gain = (L(base_q) - L(base_q + adapter)) / (L(round 0) - L(round k)):
the improvement the update brings to the model the device holds, as a share of what it
brought in fp32 (round 0 and round k eval losses from metrics.jsonl). Targets: <= 1 MB per
update, >= 90% retained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.quant import held_out_records, run_clients

TARGET_BYTES, TARGET_RETAINED = 1_000_000, 0.90


def measure(run_dir: Path, server_round: int | None, quants: list[str], clients: int, max_eval: int) -> dict:
    from transformers import AutoTokenizer

    from client.shipment import load_shipped
    from fedslm.common.config import resolve
    from fedslm.common.jsonfiles import read_json
    from fedslm.common.vocabulary import RunConfig
    from server.ship import build_adapter, build_artifacts
    from slm.base import resolve_model_dir
    from slm.evaluate import evaluate
    from slm.export_lora import applied, read_lora_gguf
    from slm.tasks import Task

    config = resolve(read_json(run_dir / "config.json", "run config"))  # keys added since the run: defaults
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "shipped" not in r and r.get("eval_loss") is not None]
    server_round = server_round or max(r["round"] for r in rows)
    untrained = next(r["eval_loss"] for r in rows if r["round"] == 0)
    trained = next(r["eval_loss"] for r in rows if r["round"] == server_round)
    out = run_dir / "bench-adapter-ship"
    started = time.time()
    specs = RunConfig.parse(config)
    bases = build_artifacts(run_dir, specs, 0, quants, out=out / "base", stem="fedslm-base")
    adapter = build_adapter(run_dir, specs, server_round, out=out)
    export_s = time.time() - started
    records = held_out_records(config, clients, max_eval)
    task = Task.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config["model.name"]), local_files_only=True)
    results = []
    for base in bases:
        model = load_shipped(base.path, base.sha256)
        alone = evaluate(model, tokenizer, task, records)["eval_loss"]
        with applied(model, read_lora_gguf(adapter.path, model.config)):
            updated = evaluate(model, tokenizer, task, records)["eval_loss"]
        results.append({"base": base.quant, "base_bytes": base.bytes, "base_loss": alone, "updated_loss": updated,
                        "retained": (alone - updated) / (untrained - trained),
                        "vs_untrained": (untrained - updated) / (untrained - trained)})
    return {"run": str(run_dir), "round": server_round, "eval_examples": len(records), "export_s": export_s,
            "adapter_bytes": adapter.bytes, "untrained": untrained, "trained": trained, "rows": results}


def render(result: dict) -> str:
    ok = result["adapter_bytes"] <= TARGET_BYTES
    lines = [f"run {result['run']} round {result['round']}: {result['eval_examples']} held-out records; "
             f"export {result['export_s']:.0f}s",
             f"update: adapter GGUF {result['adapter_bytes']:,d} bytes per device "
             f"(target <= {TARGET_BYTES:,d}: {'met' if ok else 'MISSED'})",
             f"fp32: untrained {result['untrained']:.4f} -> adapter {result['trained']:.4f} "
             f"(gain {result['untrained'] - result['trained']:.4f})",
             f"{'device base':11s} {'install bytes':>14s} {'base loss':>10s} {'+adapter':>9s} {'retained':>9s} "
             f"{'vs fp32 base':>12s}  target >= {TARGET_RETAINED:.0%}"]
    for row in result["rows"]:
        lines.append(f"{row['base']:11s} {row['base_bytes']:14,d} {row['base_loss']:10.4f} {row['updated_loss']:9.4f} "
                     f"{row['retained']:9.1%} {row['vs_untrained']:12.1%}  "
                     f"{'met' if row['retained'] >= TARGET_RETAINED else 'MISSED'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--round", type=int, help="adapter round (default: the last evaluated)")
    parser.add_argument("--quant", default="q8_0,q4_0", help="device bases")
    parser.add_argument("--clients", type=int, help="clients whose test splits to use (default: simulation.json, else 4)")
    parser.add_argument("--max-eval", type=int, default=0, help="cap per client (0 = the whole test split)")


def run(args) -> dict:
    from fedslm.common.errors import UserError
    from server.ship import parse_quants

    if not (args.run_dir / "metrics.jsonl").is_file():
        raise UserError(f"run directory {args.run_dir}: no metrics.jsonl")
    result = measure(args.run_dir, args.round, parse_quants(args.quant), args.clients or run_clients(args.run_dir),
                     args.max_eval)
    print(render(result))
    return result
