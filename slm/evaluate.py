"""Utility of a model on held-out records, per task kind (see slm.tasks).

All metrics are token- or record-weighted sums that a server can re-weight across
clients: each result carries the counts it was computed over. A label task is scored in
one pass per prompt (slm.label_scoring): its accuracy and its eval loss (the true
verbalizer's tokens) come from the same log-likelihoods.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from slm.batch import collate
from slm.frozen_prefix import with_prefix
from slm.label_scoring import score_labels
from slm.loss import CHUNK, loss_positions
from slm.tasks import Task, encode


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, records: list[dict], batch_size: int = 8,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Eval loss (mean over loss tokens), perplexity and the task's accuracies.

    ``on_progress(done, total)`` is called after each batch of records (a site's progress lines).
    """
    was_training = model.training
    model.eval()
    try:
        if task.kind == "label":
            scores = score_labels(model, tokenizer, task, records, batch_size, on_progress)
            loss_sum, tokens = scores.true_loss()
            return {**_loss_metrics(loss_sum, tokens, len(records)), "accuracy": scores.accuracy()}
        examples = [encode(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(records)]
        device = next(model.parameters()).device  # model.device: a site's GPU
        loss_sum, tokens, top1, top3 = 0.0, 0, 0, 0
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in with_prefix(model, batch).items()}  # frozen layers: once per record
            rows, targets, _, head = loss_positions(model, batch)  # hidden states of the loss tokens, (N, H)
            for s in range(0, len(rows), CHUNK):  # logits of CHUNK tokens at a time: never (B, T, V)
                logits, target = head(rows[s : s + CHUNK]).float(), targets[s : s + CHUNK]  # (n, V), (n,)
                loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
                if task.kind == "next-word":
                    best3 = logits.topk(3, dim=-1).indices  # (n, 3)
                    top1 += int((best3[:, 0] == target).sum())
                    top3 += int((best3 == target.unsqueeze(-1)).any(-1).sum())
            tokens += len(rows)
            if on_progress is not None:
                on_progress(min(start + batch_size, len(examples)), len(examples))
        metrics = _loss_metrics(loss_sum, tokens, len(records))
        if task.kind == "next-word":
            metrics["top1_accuracy"] = top1 / max(tokens, 1)
            metrics["top3_accuracy"] = top3 / max(tokens, 1)
        return metrics
    finally:
        model.train(was_training)


def _loss_metrics(loss_sum: float, tokens: int, examples: int) -> dict[str, float]:
    mean = loss_sum / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)),
            "eval_tokens": float(tokens), "eval_examples": float(examples)}


__all__ = ["evaluate"]
