"""``python -m benchmarks secagg``: what secure aggregation costs per round against clear FFA-LoRA.

Two federations of the same sites, rounds and settings (the tiny model by default, 4
clients): one with ``server.secure-aggregation``, one without. Per training round, from
metrics.jsonl: messages the coordinator sends (clear: one train message per site; secure:
four SecAgg+ stages), bytes down and up (clear: the adapter arrays; secure: every record of
every stage, keys, encrypted shares and int64 masked vectors included) and seconds (the
round's wall time, its evaluation included, the same in both).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.measure import simulate, table


def run(model: str = "tiny", clients: int = 4, rounds: int = 2, out: Path | None = None) -> dict:
    root = Path(out or tempfile.mkdtemp(prefix="bench-secagg-"))
    settings = {"model.name": model, "server.aggregation": "ffa", "server.min-clients": 2}
    results = {}
    for label, secure in (("clear", False), ("secure", True)):
        result = simulate("tiny", root / label, clients, {**settings, "server.secure-aggregation": secure}, rounds)
        training = [r for r in result.rows if r["round"] >= 1 and "sampled" in r and not r.get("skipped")]
        if len(training) != rounds:
            raise RuntimeError(f"{label}: {len(training)} of {rounds} rounds trained ({result.out})")
        results[label] = {
            "messages": sum(r.get("secure_aggregation", {}).get("messages", r["sampled"]) for r in training) / rounds,
            "bytes_down": sum(r["bytes_down"] for r in training) / rounds,
            "bytes_up": sum(r["bytes_up"] for r in training) / rounds,
            "seconds": sum(r["seconds"] for r in training) / rounds,
            "wall": result.wall}
    clear, secure = results["clear"], results["secure"]
    rows = [[name, clear[name], secure[name], secure[name] - clear[name], secure[name] / clear[name]]
            for name in ("messages", "bytes_down", "bytes_up", "seconds")]
    print(f"secure aggregation vs clear FFA, {model}, {clients} clients, per training round (mean of {rounds}):")
    print(table(["per round", "clear", "secure", "extra", "ratio"], rows))
    return {"model": model, "clients": clients, "rounds": rounds, **results}
