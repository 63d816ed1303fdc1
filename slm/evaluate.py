"""Utility of a model on held-out records, per task kind (see slm.tasks).

All metrics are token- or record-weighted sums that a server can re-weight across
clients: each result carries the counts it was computed over.
"""

from __future__ import annotations

import math

import torch

from slm.tasks import Task, collate, encode, per_example_loss, token_losses


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, records: list[dict], batch_size: int = 8) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        examples = [encode(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(records)]
        loss_sum, tokens, top1, top3 = 0.0, 0, 0, 0
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses, mask = token_losses(logits, batch["labels"])
            loss_sum += float(losses.sum())
            tokens += int(mask.sum())
            if task.kind == "next-word":
                target = batch["labels"][:, 1:]
                best3 = logits[:, :-1, :].topk(3, dim=-1).indices  # (B, T-1, 3)
                top1 += int(((best3[..., 0] == target) & mask).sum())
                top3 += int(((best3 == target.unsqueeze(-1)).any(-1) & mask).sum())
        mean = loss_sum / max(tokens, 1)
        metrics = {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                   "eval_tokens": float(tokens), "eval_examples": float(len(records))}
        if task.kind == "next-word":
            metrics["top1_accuracy"] = top1 / max(tokens, 1)
            metrics["top3_accuracy"] = top3 / max(tokens, 1)
        if task.kind == "label":
            metrics["accuracy"] = label_accuracy(model, tokenizer, task, records, batch_size)
        return metrics
    finally:
        model.train(was_training)


@torch.no_grad()
def label_accuracy(model, tokenizer, task: Task, records: list[dict], batch_size: int = 8) -> float:
    """Share of records whose true label's verbalizer has the highest log-likelihood.

    Every record is scored once per candidate label (the same prompt with each verbalizer
    as the completion); the summed token log-likelihood of the verbalizer decides.
    """
    correct = 0
    for record in records:
        candidates = [encode(task, tokenizer, {**record, task.label_field: value}) for value, _ in task.verbalizers]
        batch = collate(candidates, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, mask = token_losses(logits, batch["labels"])
        scores = -losses.sum(dim=1)  # log-likelihood of each verbalizer, (L,)
        truth = [value for value, _ in task.verbalizers].index(str(record[task.label_field]))
        correct += int(int(scores.argmax()) == truth)
    return correct / max(len(records), 1)


__all__ = ["evaluate", "label_accuracy", "per_example_loss"]
