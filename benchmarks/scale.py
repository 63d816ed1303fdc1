"""Phone scale: memory and time of the ``phone`` scenario at several client counts.

The same work runs at every size (10 clients expected per round, 20 evaluating), so what
changes between sizes is only the number of clients the federation knows about. Peak
memory is the summed RSS of the run's process tree (driver, Ray, the worker); it must
not grow with the number of clients: a client is a partition id until it is sampled.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.measure import mib, simulate, table
from benchmarks.phone_data import first_users
from simulation.scenarios import PHONE_DATA

PER_ROUND, EVALUATING = 10, 20


def run(counts: list[int], rounds: int = 2, model: str = "", out: Path | None = None) -> list[dict]:
    root = Path(out or tempfile.mkdtemp(prefix="fedslm-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for count in counts:
        data = root / f"users-{count}.jsonl"
        users = first_users(PHONE_DATA, data, count)
        settings = {"data.path": data, "server.fraction-train": min(1.0, PER_ROUND / users),
                    "server.fraction-evaluate": min(1.0, EVALUATING / users), "server.min-clients": 1,
                    "ship.quantizations": ""}  # rounds only: shipping is bench adapter-ship's
        result = simulate("phone", root / f"run-{users}", users, settings, rounds, model)
        trained = [r for r in result.rows if r["round"] > 0 and "shipped" not in r]
        results.append({"clients": users, "rounds": len(trained),
                        "sampled per round": sum(r["sampled"] for r in trained) / max(len(trained), 1),
                        "wall s": result.wall, "round s": sum(r["seconds"] for r in trained) / max(len(trained), 1),
                        "peak RSS MiB": mib(result.peak_rss), "largest process MiB": mib(result.peak_rss_process),
                        "eval loss r0": result.rows[0]["eval_loss"], "eval loss end": trained[-1]["eval_loss"]})
    base = results[0]
    for r in results:
        r["RSS vs first"] = r["peak RSS MiB"] / base["peak RSS MiB"]
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results
