"""Warm start: the hospital demo at epsilon 8 from the shared seed's adapter, and from one the coordinator trained
on public data (issue 28, item 3).

The public file is MedQuAD questions and answers of the institutes that no demo hospital holds
(the demo's four sites are GARD, GHR, MPlusHealthTopics and NINDS): the same kind of data, none
of the sites' records, no budget spent. ``fedslm warm-start`` trains on it without DP (FFA-LoRA:
B only), then the demo runs twice with the same seeds, rounds and budgets, once from the seed's
adapter and once from the warm one; the eval loss is the sites' held-out loss, as the demo prints.
Also reported: the share of the non-private gain each keeps (the non-private demo run,
``--reference``, or BENCHMARKS.md's 2.0957 when it is not rerun).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from itertools import zip_longest
from pathlib import Path

from benchmarks.measure import simulate, table
from benchmarks.privacy_utility import shared_file

PUBLIC_SOURCES = ("CancerGov", "NIDDK", "NHLBI", "CDC", "NIHSeniorHealth")  # no demo site holds these
NON_PRIVATE_FINAL = 2.0957  # BENCHMARKS.md: the demo's eval loss after 3 rounds without DP (Dec 2026)


def public_excerpt(out: Path, records: int) -> Path:
    """``records`` question/answer pairs, round robin over PUBLIC_SOURCES (read from shared/data, never copied)."""
    by_source: dict[str, list[dict]] = {source: [] for source in PUBLIC_SOURCES}
    for line in shared_file("medquad/medquad_answered.jsonl").open():
        row = json.loads(line)
        if row["source"] in by_source:
            by_source[row["source"]].append({"question": " ".join(row["question"].split()),
                                             "answer": " ".join(row["answer"].split()), "source": row["source"]})
    rows = [r for group in zip_longest(*by_source.values()) for r in group if r is not None][:records]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run(records: int = 1000, steps: int = 100, lr: float = 1e-3, rounds: int = 3, reference: bool = False,
        out: Path | None = None) -> list[dict]:
    root = Path(out or tempfile.mkdtemp(prefix="fedslm-bench-warm-"))
    root.mkdir(parents=True, exist_ok=True)
    public = public_excerpt(root / "public-medquad.jsonl", records)
    start = root / "warm-start"
    command = [sys.executable, "-m", "fedslm", "warm-start", str(public), "--out", str(start),
               "--steps", str(steps), "--lr", str(lr)]
    warm = subprocess.run(command, capture_output=True, text=True)
    if warm.returncode != 0:
        raise RuntimeError(f"fedslm warm-start failed:\n{warm.stdout[-2000:]}{warm.stderr[-2000:]}")
    record = json.loads((start / "warm_start.json").read_text())
    fixed = {"ship.quantizations": "", "dp.noise-seed": 0}
    runs = [("seed's adapter", "run-seed", fixed),
            ("warm start", "run-warm", {**fixed, "server.initial-adapter": str(start)})]
    if reference:
        runs.append(("no DP, seed's adapter", "run-no-dp", {**fixed, "dp.enabled": False}))
    results = []
    for name, directory, settings in runs:
        result = simulate("hospital", root / directory, 4, settings, rounds)
        results.append({"start": name, "round 0": result.rows[0]["eval_loss"],
                        "final": [r for r in result.rows if r["round"] > 0][-1]["eval_loss"], "wall s": result.wall})
    base = results[0]["round 0"]
    clean = results[2]["final"] if reference else NON_PRIVATE_FINAL
    for r in results:
        r["share of non-private gain"] = f"{(base - r['final']) / (base - clean):.0%}"
    print(f"Warm start: hospital demo, {rounds} rounds, eps 8 per site; public file {records} MedQuAD pairs of "
          f"{', '.join(PUBLIC_SOURCES)}; warm start {steps} steps, lr {lr:g}, {record['seconds']:.0f} s "
          f"(held-out loss {record['held_out_before']['eval_loss']:.4f} -> {record['held_out_after']['eval_loss']:.4f})"
          f"; non-private reference final {clean:.4f}")
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results
