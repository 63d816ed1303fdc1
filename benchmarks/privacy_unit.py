"""What protecting people instead of records costs: utility, step time and memory (`python -m benchmarks privacy-unit`).

Data with several records per person: MedQuAD grouped by ``focus`` (the condition a set of
questions is about) as "patients" within each institute. Four institutes with several
questions per focus (CancerGov, NHLBI, NIDDK, NINDS), each cut to whole focuses up to
``--records`` records, natural split by institute (a site each). Read from the shared data
folder, never copied into the project.

1. Utility, same data and compute (rounds, local steps, learning rate, window, evaluation
   records; the expected batch in RECORDS matched: the unit run's expected patients times
   their mean records per step): no DP; record-level DP at eps 8 (with the honest
   per-patient conversion of its epsilon: group privacy for the patient with the most
   records, privacy.report.neighbouring.epsilon_group); patient-level DP at eps 8.
2. Step time: one DP-SGD step of the same rows, per-record clipping vs per-unit mean then
   clipping (client.unit_sgd), hooks mode, median of ``--repeats``.
3. Memory as units grow: peak RSS of a process training a few unit-level steps at a fixed
   expected batch while the site's unit count grows 10x and 100x (tiny model).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.measure import simulate, table
from benchmarks.privacy_utility import shared_file

INSTITUTES = ("CancerGov", "NHLBI", "NIDDK", "NINDS")


def patient_file(out: Path, records: int) -> tuple[Path, dict]:
    """Whole focuses of each institute up to ``records`` records; (file, per-institute statistics)."""
    by_source: dict[str, list[dict]] = {s: [] for s in INSTITUTES}
    for line in shared_file("medquad/medquad_answered.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        if row["source"] in by_source:
            by_source[row["source"]].append({k: row[k] for k in ("source", "focus", "question", "answer")})
    kept, stats = [], {}
    for source, rows in by_source.items():
        order = list(dict.fromkeys(r["focus"] for r in rows))
        chosen: list[dict] = []
        for focus in order:
            mine = [r for r in rows if r["focus"] == focus]
            if len(chosen) + len(mine) > records:
                break
            chosen += mine
        counts = Counter(r["focus"] for r in chosen)
        stats[source] = {"records": len(chosen), "patients": len(counts), "most": max(counts.values())}
        kept += chosen
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return out, stats


def utility(root: Path, records: int, rounds: int, steps: int, batch: int, k: int, length: int, model: str,
            eval_examples: int) -> list[dict]:
    data, stats = patient_file(root / "medquad-by-focus.jsonl", records)
    mean_used = sum(min(k, n) for n in _unit_sizes(data).values()) / len(_unit_sizes(data))
    unit_batch = max(1, round(batch / mean_used))
    common = {"data.path": data, "data.task": "sft", "data.partition": "natural", "data.partition-by": "source",
              "model.max-length": length, "train.local-steps": steps, "train.lr": 1e-2, "server.aggregation": "ffa",
              "server.min-clients": 4, "data.max-eval-examples": eval_examples, "ship.quantizations": "",
              "lora.dropout": 0.0, "data.test-fraction": 0.15}
    dp = {"dp.enabled": True, "dp.target-epsilon": 8.0, "dp.max-epsilon": 8.0}
    points = [("no DP", {"dp.enabled": False, "train.batch-size": batch, "dp.group-field": "focus"}),
              ("record-level eps 8", {**dp, "train.batch-size": batch, "dp.group-field": "focus"}),
              (f"patient-level eps 8 (k={k})", {**dp, "train.batch-size": unit_batch, "dp.privacy-unit-field": "focus",
                                                "dp.max-records-per-unit": k, "dp.privacy-unit-name": "patient"})]
    results = []
    for name, settings in points:
        run = simulate("hospital", root / name.split()[0], 4, {**common, **settings}, rounds, model)
        first, last = run.rows[0], [r for r in run.rows if r["round"] > 0][-1]
        report = _report(run.out)
        clients = report["clients"].values()
        eps = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
        group = [c["epsilon_group"] for c in clients if c.get("epsilon_group") is not None]
        gain = first["eval_loss"] - last["eval_loss"]
        results.append({"run": name, "expected batch": f"{settings['train.batch-size']} "
                        + ("patients" if "dp.privacy-unit-field" in settings else "records"),
                        "round 0": first["eval_loss"], "final": last["eval_loss"], "gain": gain,
                        "eps per record": "-" if not eps or "privacy-unit" in str(settings) else f"{max(eps):.2f}",
                        "eps per patient": ("inf" if not eps else f"{max(eps):.2f}" if "dp.privacy-unit-field" in settings
                                            else f"{max(group):.2f} (group)" if group else "-"),
                        "wall s": run.wall})
    clean = results[0]["gain"]
    for r in results:
        r["gain kept"] = f"{100 * r['gain'] / clean:.0f}%" if clean > 0 else "-"
    print(f"Utility: {model}, 4 institutes (natural split), whole focuses up to {records} records each, {rounds} rounds "
          f"x {steps} steps, T<={length}, eval <= {eval_examples} records per site; patients per site: "
          + ", ".join(f"{s} {v['patients']} ({v['records']} records, most {v['most']})" for s, v in stats.items()))
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results


def _unit_sizes(data: Path) -> Counter:
    return Counter((r["source"], r["focus"]) for r in map(json.loads, data.read_text().splitlines()))


def _report(run_dir: Path) -> dict:
    """The report the run wrote (report.json): its epsilons, recomputed from the events, per client."""
    return json.loads((run_dir / "report.json").read_text())


def step_time(model: str, rows: int, units: int, length: int, repeats: int) -> dict:
    """Median seconds of one DP step on the same ``rows`` rows: per-record clipping vs ``units`` units."""
    import torch

    from client.train import make_private, take_step
    from fedslm.common.config import resolve
    from privacy.mechanism.randomness import DpRandom, seed_key
    from slm.batch import collate
    from slm.lora import LoraSpec, attach
    from slm.tasks import Task, encode

    config = resolve({"model.name": model, "model.max-length": length, "lora.dropout": 0.0})
    net, tok = attach(model, LoraSpec.from_config(config))
    task = Task(kind="sft", max_length=length)
    text = "Glaucoma is a group of diseases that can damage the eye's optic nerve. " * 8
    batch = collate([encode(task, tok, {"question": f"What is glaucoma ({i})?", "answer": text}) for i in range(rows)],
                    tok.pad_token_id)
    segments = [i * units // rows for i in range(rows)]
    times = {}
    for name, segs in (("per record", None), (f"per unit ({units} units)", segments)):
        params = [p for p in net.parameters() if p.requires_grad]
        forward, optimizer = make_private(net, torch.optim.SGD(params, lr=0.0), mode="hooks", noise_multiplier=1.0,
                                          clip_norm=1.0, batch_size=units if segs else rows,
                                          dp_random=DpRandom(seed_key(0)))
        take_step(forward, optimizer, batch, mode="hooks", segments=segs)  # warm-up
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            take_step(forward, optimizer, batch, mode="hooks", segments=segs)
            samples.append(time.perf_counter() - started)
        forward._close()
        times[name] = statistics.median(samples)
    base = times["per record"]
    result = {"model": model, "rows": rows, **{f"{k} s": v for k, v in times.items()},
              "ratio": max(times.values()) / base if base else float("nan")}
    print(f"Step time: {model}, {rows} rows of <= {length} tokens, hooks, median of {repeats}")
    print(table(list(result), [list(result.values())]))
    return result


MEMORY_CHILD = """
import json, sys, threading, time
import psutil
from client.train import train_adapter
from client.units import group_by_unit
from fedslm.common.config import resolve
from slm.lora import LoraSpec, attach
from slm.tasks import Task
units, per_unit = int(sys.argv[1]), int(sys.argv[2])
config = resolve({"model.name": "tiny", "model.max-length": 48, "lora.dropout": 0.0})
model, tok = attach("tiny", LoraSpec.from_config(config))
rows = [{"question": f"note {i}?", "answer": "a short answer", "pid": i % units} for i in range(units * per_unit)]
me, peak, done = psutil.Process(), [0], []
def sample():  # the current RSS every 5 ms: ru_maxrss would keep the model loading's peak
    while not done:
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.005)
before = me.memory_info().rss
watcher = threading.Thread(target=sample)
watcher.start()
train_adapter(model, tok, Task(kind="sft", max_length=48), rows, steps=4, batch_size=8, lr=0.01,
              noise_multiplier=1.0, clip_norm=1.0, seed=0, units=group_by_unit(rows, "pid"), max_records_per_unit=4)
done.append(1)
watcher.join()
print(json.dumps({"before": before, "peak": peak[0]}))
"""


def memory(unit_counts: list[int], per_unit: int) -> list[dict]:
    """Peak RSS (MiB) of a few unit-level steps at an expected 8 units per step, as the unit count grows."""
    results = []
    for units in unit_counts:
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(units), str(per_unit)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        doc = json.loads(out)
        results.append({"units": units, "records": units * per_unit, "RSS before MiB": doc["before"] / 2**20,
                        "training adds MiB": (doc["peak"] - doc["before"]) / 2**20})
    print(f"Memory: tiny model, 4 unit-level steps at 8 expected units x <= 4 records, {per_unit} records per unit")
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results


def run(parts: list[str], *, records: int, rounds: int, steps: int, batch: int, k: int, length: int, model: str,
        eval_examples: int, repeats: int, out: Path | None) -> dict:
    root = Path(out or tempfile.mkdtemp(prefix="fedslm-bench-unit-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    if "step" in parts:
        results["step"] = step_time(model, rows=16, units=4, length=length, repeats=repeats)
    if "memory" in parts:
        results["memory"] = memory([100, 1000, 10000], per_unit=3)
    if "utility" in parts:
        results["utility"] = utility(root, records, rounds, steps, batch, k, length, model, eval_examples)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results
