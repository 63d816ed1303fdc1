"""Side-by-side summary of run directories: utility, traffic and privacy per run."""

from __future__ import annotations

import json
from pathlib import Path

from fedslm.common.errors import UserError


def summarize(run_dir: str) -> dict:
    path = Path(run_dir)
    try:
        config = json.loads((path / "config.json").read_text())
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError as err:
        raise UserError(f"run directory {run_dir}: {Path(err.filename).name} is missing") from None
    except json.JSONDecodeError as err:
        raise UserError(f"run directory {run_dir}: corrupt JSON ({err})") from None
    # rows marked "interrupted" hold only a counted user-level release of a round trained again after a resume
    trained = [r for r in rows if r["round"] > 0 and not r.get("skipped") and "shipped" not in r
               and not r.get("interrupted")]
    eps = [p.get("epsilon") for r in _privacy_rows(path) for p in [r] if p.get("epsilon") is not None]
    return {
        "run": path.name,
        "aggregation": config.get("server.aggregation", "fedavg"),  # as recorded: the one used ("auto" in old runs)
        "dp": config.get("dp.enabled"),
        "rounds": len(trained),
        "eval_loss_round0": rows[0]["eval_loss"] if rows else None,
        "eval_loss_final": trained[-1]["eval_loss"] if trained else None,
        "bytes_up_per_client_round": _mean([r["bytes_up"] / max(_contributors(r), 1) for r in trained]),
        "bytes_down_per_client_round": _mean([r["bytes_down"] / max(r.get("sampled", 1), 1) for r in trained]),
        "max_client_epsilon": max(eps) if eps else None,
    }


def _contributors(row: dict) -> int:
    """Under user-level DP a row gives the cohort's size, never its members."""
    return row["cohort"] if "cohort" in row else len(row["participants"])


def _privacy_rows(path: Path) -> list[dict]:
    view = path / "privacy" / "ledger.json"
    if not view.is_file():
        return []
    return [r for records in json.loads(view.read_text())["clients"].values() for r in records]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def render(summaries: list[dict]) -> str:
    head = f"{'run':<24} {'agg':<7} {'dp':<5} {'rounds':>6} {'loss r0':>8} {'loss end':>8} {'change':>7} " \
           f"{'up B/cl':>9} {'down B/cl':>9} {'max eps':>7}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        first, final = s["eval_loss_round0"], s["eval_loss_final"]  # null: no site evaluated
        change = (final / first - 1) * 100 if final and first else float("nan")
        lines.append(f"{s['run'][:24]:<24} {str(s['aggregation']):<7} {str(s['dp']):<5} {s['rounds']:>6} "
                     f"{first if first is not None else float('nan'):>8.4f} {final or float('nan'):>8.4f} {change:>6.2f}% "
                     f"{s['bytes_up_per_client_round'] or 0:>9.0f} {s['bytes_down_per_client_round'] or 0:>9.0f} "
                     f"{s['max_client_epsilon'] if s['max_client_epsilon'] is not None else float('nan'):>7.3f}")
    return "\n".join(lines)
