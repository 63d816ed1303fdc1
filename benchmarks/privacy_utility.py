"""Privacy-utility: the same federation at epsilon 1, 3, 8 and without DP, per task.

Every point is a real ``fedslm simulate`` run (4 clients, Flower simulation engine) with
the same compute: rounds, local steps, expected batch, learning rate, FFA-LoRA
aggregation and evaluation sets are fixed, only the per-client DP target changes (each
client calibrates its noise so that all planned rounds fit epsilon; 'inf' = DP off).
Tasks: label scoring on an SST-2 subset (2,000 training sentences) and on PubMedQA
(500 expert-labelled questions, yes/no/maybe), and instruction SFT on the packaged
MedQuAD excerpt (4 institutes, natural split). ``sst2-dev`` is the curve the literature
reports: the whole SST-2 train split (67,349 sentences) over 4 iid clients, evaluated on
the whole dev set (872 sentences, ``data.eval-path``: each client scores its iid quarter).
Utility is the federated accuracy (label tasks, with its standard error
sqrt(p (1 - p) / n) over the n evaluated records) or the federated eval loss (SFT) after the
last round, next to round 0. ``overrides`` (``--set``) apply to every point: a recipe.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

from benchmarks.measure import simulate, table
from fedslm.common.errors import UserError
from simulation.scenarios import DEMO_DATA

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # next to the checkout; FEDSLM_SHARED_DATA overrides
EPSILONS = ["1", "3", "8", "inf"]


def shared_file(relative: str) -> Path:
    """A file of the workplace's shared data folder (never copied into the project)."""
    path = Path(os.environ.get("FEDSLM_SHARED_DATA") or SHARED) / relative
    if not path.is_file():
        raise UserError(f"benchmark data {path} not found (set FEDSLM_SHARED_DATA to the shared data folder)")
    return path


def sst2_subset(out: Path, rows: int = 2000) -> Path:
    """The first ``rows`` sentences of SST-2 train (read from shared/data, never copied into the project)."""
    with shared_file("sst2/train.tsv").open() as handle, out.open("w", newline="") as target:
        reader, writer = csv.reader(handle, delimiter="\t"), csv.writer(target, delimiter="\t")
        for i, row in enumerate(reader):
            if i > rows:
                break
            writer.writerow([cell.strip() for cell in row])
    return out


QTYPE_SITES = ("CancerGov", "NIDDK", "NIHSeniorHealth", "NHLBI")  # 6 to 10 question types each, 14 in all
QTYPE_PER_SITE_AND_TYPE = 40  # sites of 285 to 380 records: the small sites of issue 28


def medquad_qtype(out: Path) -> Path:
    """A many-class label file: MedQuAD's question type from the question's text, one site per institute.

    The first QTYPE_PER_SITE_AND_TYPE questions of each (institute, type) of the four institutes in
    QTYPE_SITES; a type with fewer than 5 questions at an institute is left out there (so a site's
    labels are its own, as in a federation split by institute). Read from shared/data, never copied.
    """
    import json
    from collections import Counter

    rows = [json.loads(line) for line in shared_file("medquad/medquad_answered.jsonl").open()]
    rows = [r for r in rows if r["source"] in QTYPE_SITES]
    common = Counter((r["source"], r["qtype"]) for r in rows)
    taken: Counter = Counter()
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "qtype", "source"])
        for r in rows:
            key = (r["source"], r["qtype"])
            if common[key] >= 5 and taken[key] < QTYPE_PER_SITE_AND_TYPE:
                taken[key] += 1
                writer.writerow([" ".join(r["question"].split()), r["qtype"].replace(" ", "-"), r["source"]])
    return out


def task_config(name: str, root: Path) -> dict:
    """The data settings of one task; only the tasks asked for touch their files."""
    label = {"data.task": "label", "data.partition": "iid"}
    if name == "sst2":
        return {**label, "data.path": sst2_subset(root / "sst2-2000.tsv"), "data.text-field": "sentence",
                "data.label-field": "label", "data.verbalizers": "0=negative,1=positive"}
    if name == "sst2-dev":
        return {**label, "data.path": shared_file("sst2/train.tsv"), "data.eval-path": shared_file("sst2/dev.tsv"),
                "data.text-field": "sentence", "data.label-field": "label",
                "data.verbalizers": "0=negative,1=positive"}
    if name == "pubmedqa":
        return {**label, "data.path": shared_file("pubmedqa/pqal_trainval.jsonl"), "data.text-field": "question",
                "data.label-field": "label", "data.verbalizers": "yes=yes,no=no,maybe=maybe"}
    if name == "medquad":  # the packaged excerpt
        return {"data.task": "sft", "data.path": str(DEMO_DATA), "data.partition": "natural",
                "data.partition-by": "source"}
    if name == "medquad-qtype":  # 15 classes, 4 institutes
        return {"data.task": "label", "data.path": medquad_qtype(root / "medquad-qtype.csv"),
                "data.text-field": "question", "data.label-field": "qtype", "data.partition": "natural",
                "data.partition-by": "source"}
    raise UserError(f"privacy-utility: unknown task '{name}' (choose from sst2, sst2-dev, pubmedqa, medquad, "
                    "medquad-qtype)")


def compute(rounds: int, steps: int, batch: int, length: int, eval_examples: int) -> dict:
    """The fixed compute of every point."""
    return {"model.max-length": length, "train.local-steps": steps, "train.batch-size": batch, "train.lr": 1e-2,
            "server.aggregation": "ffa", "server.min-clients": 4, "data.max-train-examples": 0,
            "data.max-eval-examples": eval_examples, "ship.quantizations": "", "lora.dropout": 0.0}


def run(task_names: list[str], epsilons: list[str] | None = None, rounds: int = 3, steps: int = 8, batch: int = 8,
        length: int = 64, eval_examples: int = 64, model: str = "smollm2", out: Path | None = None,
        overrides: dict | None = None) -> list[dict]:
    root = Path(out or tempfile.mkdtemp(prefix="fedslm-bench-pu-"))
    root.mkdir(parents=True, exist_ok=True)
    available = {name: task_config(name, root) for name in task_names}
    fixed = {**compute(rounds, steps, batch, length, eval_examples), **(overrides or {})}
    results = []
    for name in task_names:
        for eps in epsilons or EPSILONS:
            dp = {"dp.enabled": False} if eps == "inf" else \
                {"dp.enabled": True, "dp.target-epsilon": float(eps), "dp.max-epsilon": float(eps)}
            settings = {**fixed, **available[name], **dp}
            if name == "sst2-dev":
                settings["data.max-eval-examples"] = 0  # the whole dev set
            result = simulate("tiny", root / f"{name}-eps{eps}", 4, settings, rounds, model)
            first, last = result.rows[0], [r for r in result.rows if r["round"] > 0][-1]
            sigmas = sorted({p.get("noise_multiplier") for p in _privacy(result.out) if p.get("noise_multiplier")})
            metric = "accuracy" if "accuracy" in last else "eval_loss"
            evaluated = sum(c["eval_examples"] for c in last["eval_clients"].values())
            stderr = math.sqrt(last[metric] * (1 - last[metric]) / evaluated) if metric == "accuracy" else None
            results.append({"task": name, "epsilon": eps, "metric": metric, "round 0": first[metric],
                            "final": last[metric], "stderr": "-" if stderr is None else f"{100 * stderr:.1f} pts",
                            "eval records": int(evaluated),
                            "sigma": ", ".join(f"{s:.2f}" for s in sigmas) or "-", "wall s": result.wall})
    by_task = {}
    for r in results:
        by_task.setdefault(r["task"], {})[r["epsilon"]] = r["final"]
    for r in results:
        clean = by_task[r["task"]].get("inf")
        r["vs non-private"] = "" if clean is None else \
            (f"{(r['final'] - clean) * 100:+.1f} pts" if r["metric"] == "accuracy" else f"{r['final'] - clean:+.4f}")
    window = fixed["model.max-length"]
    print(f"Privacy-utility: {model}, 4 clients, {rounds} rounds x {steps} steps, B={batch}, "
          f"{f'T<={window}' if window else 'T fitted to the data'}, "
          f"FFA-LoRA, eval <= {eval_examples} records per client (sst2-dev: all 872)"
          + "".join(f", {k}={v}" for k, v in (overrides or {}).items()))
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results


def _privacy(run_dir: Path) -> list[dict]:
    import json

    view = run_dir / "privacy" / "ledger.json"
    if not view.is_file():
        return []
    return [r for records in json.loads(view.read_text())["clients"].values() for r in records]
