"""``python -m benchmarks label-scoring``: one-pass label scoring against one forward of the prompt and the K-pass scorer.

Per record, interleaved (so a load change on a shared machine hits all three alike):
one plain forward of the record's prompt (full-vocabulary logits, ``slm.tasks.prompt_ids``),
the one-pass scorer on that record alone (``slm.label_scoring.score_labels``), and the
K-pass reference (``reference_scores``: every candidate as a full sequence, as evaluation
did before). Then the one-pass scorer over all records in batches (what ``evaluate`` runs).
Checks that both scorers give the same answers and prints their largest log-likelihood
difference.

Data: SST-2 dev sentences (../shared/data/sst2/dev.tsv, or under $FEDSLM_SHARED_DATA), K=2 with negative/positive; the
same sentences with 24 word labels drawn from a seeded generator for K=24 (only the cost
and the agreement matter there, not the accuracy).
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import torch

from benchmarks.measure import table
from benchmarks.privacy_utility import shared_file
from fedslm.common.config import resolve
from slm.label_scoring import reference_scores, score_labels
from slm.lora import LoraSpec, attach
from slm.tasks import Task, parse_verbalizers, prompt_ids

WORDS_24 = ("sports,politics,health,science,music,travel,food,business,history,weather,fashion,law,art,religion,"
            "education,cars,games,movies,books,finance,nature,crime,family,technology")


def sst2_sentences(path: Path, count: int) -> list[tuple[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence"].strip(), r["label"].strip()) for r in rows[:count]]


def tasks(length: int, sentences: list[tuple[str, str]]) -> dict[int, tuple[Task, list[dict]]]:
    words = WORDS_24.split(",")
    draw = random.Random(0)
    return {
        2: (Task(kind="label", max_length=length, verbalizers=parse_verbalizers("0=negative,1=positive")),
            [{"text": text, "label": label} for text, label in sentences]),
        24: (Task(kind="label", max_length=length, verbalizers=parse_verbalizers(",".join(f"{w}={w}" for w in words))),
             [{"text": text, "label": draw.choice(words)} for text, _ in sentences]),
    }


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


@torch.no_grad()
def measure(model, tokenizer, task: Task, records: list[dict], batch_size: int) -> dict:
    plain = one_pass = k_pass = 0.0
    new, old = [], []
    for i, record in enumerate(records):
        ids = torch.tensor([prompt_ids(task, tokenizer, record)])
        runs = {"plain": lambda: model(input_ids=ids).logits,
                "new": lambda: score_labels(model, tokenizer, task, [record]).log_likelihoods[0],
                "old": lambda: reference_scores(model, tokenizer, task, [record])[0]}
        order = list(runs)[i % 3:] + list(runs)[: i % 3]  # rotate who runs first
        for name in order:
            seconds, out = _timed(runs[name])
            if name == "plain":
                plain += seconds
            elif name == "new":
                one_pass += seconds
                new.append(out)
            else:
                k_pass += seconds
                old.append(out)
    batched, scores = _timed(lambda: score_labels(model, tokenizer, task, records, batch_size))
    new_t, old_t = torch.stack(new), torch.stack(old)
    n = len(records)
    return {"K": len(task.verbalizers), "records": n,
            "prompt tokens": sum(len(prompt_ids(task, tokenizer, r)) for r in records) / n,
            "plain forward s": plain / n, "one-pass s": one_pass / n, "batched s": batched / n,
            "K-pass s": k_pass / n, "one-pass / plain": one_pass / plain, "batched / plain": batched / plain,
            "K-pass / plain": k_pass / plain,
            "same answers": "yes" if bool((new_t.argmax(1) == old_t.argmax(1)).all()
                                 and scores.answers == old_t.argmax(1).tolist()) else "NO",
            "max |dLL|": float((new_t - old_t).abs().max())}


def run(model_name: str, records: int, length: int, batch_size: int, classes: list[int]) -> list[dict]:
    config = resolve({"model.name": model_name})
    model, tokenizer = attach(model_name, LoraSpec.from_config(config), config["model.dtype"])
    model.eval()
    sentences = sst2_sentences(shared_file("sst2/dev.tsv"), records)
    results = []
    for k, (task, data) in tasks(length, sentences).items():
        if k in classes:
            score_labels(model, tokenizer, task, data[:1])  # warm-up
            results.append(measure(model, tokenizer, task, data, batch_size))
    head = list(results[0])
    print(f"label scoring on {model_name}, {records} SST-2 dev sentences, max length {length}, "
          f"{torch.get_num_threads()} threads (seconds per record)")
    print(table(head, [[r[h] for h in head] for r in results]))
    return results
