"""Federated evaluation: which clients evaluate, and one summary over their replies."""

from __future__ import annotations

import math
import random

from fedslm.common.errors import UserError
from server.intake import Intake, Names

ACCURACIES = ("accuracy", "top1_accuracy", "top3_accuracy")
SHOWN = (("accuracy", "accuracy"), ("top1_accuracy", "top-1"))  # the accuracy on the console: label, next-word


def evaluation_name(reply) -> str:
    return str(reply.content["info"]["client"]) or None  # a site whose node config names nobody keeps node-<id>


def summarize(intake: Intake, names: Names) -> dict:
    """Token-weighted eval loss (example-weighted accuracies) over the usable replies.

    Replies under a duplicate site name are listed in ``eval_rejected``, never merged:
    one entry per name would let one site's loss stand for several.
    """
    per_client, loss_sum, tokens, refused = {}, 0.0, 0.0, []
    for _, name, reply in intake.usable:
        if "metrics" not in reply.content:  # the site refused (evaluation off, its cap, its budget): a reason code
            refused.append({"client": name, "reason": str(reply.content["privacy"].get("reason", ""))})
            continue
        metrics = dict(reply.content["metrics"])
        per_client[name] = metrics
        loss_sum += metrics["eval_loss"] * metrics["eval_tokens"]
        tokens += metrics["eval_tokens"]
    summary = {"eval_loss": loss_sum / tokens if tokens else math.nan, "eval_clients": per_client}
    for key in ACCURACIES:
        weighted = [(m[key], m["eval_examples"]) for m in per_client.values() if key in m]
        if weighted:
            summary[key] = sum(v * n for v, n in weighted) / max(sum(n for _, n in weighted), 1)
    if refused:
        summary["eval_refused"] = refused
    if intake.failed:
        summary["eval_errors"] = [f"{names(node)}: {why}" for node, why in intake.failed]
    if intake.duplicate:
        summary["eval_rejected"] = [{"client": name, "reason": why} for _, name, why in intake.duplicate]
    return summary


def describe(summary: dict, label: str) -> list[str]:
    """Console lines for one evaluation: the loss and the task's accuracy (label tasks: accuracy,
    next-word: top-1), weighted over clients and per client."""
    per_client = summary["eval_clients"]
    key, name = next(((key, name) for key, name in SHOWN if key in summary), (None, None))

    def client(m: dict) -> str:
        return f"{m['eval_loss']:.4f}" + (f" {m[key]:.1%}" if key in m else "")

    problems = ([f"evaluation failed on {error}" for error in summary.get("eval_errors", [])]
                + [f"{entry['client']} refused to evaluate: {entry['reason']}"
                   for entry in summary.get("eval_refused", [])]
                + [f"{label} reply rejected: {entry['reason']}" for entry in summary.get("eval_rejected", [])])
    if not per_client:  # no loss to give: say why in words, never "loss nan ()"
        counts = [f"{len(summary.get(k, []))} {what}" for k, what in
                  (("eval_refused", "refused"), ("eval_errors", "failed"), ("eval_rejected", "rejected"))
                  if summary.get(k) or k != "eval_rejected"]
        return [f"{label}: no site evaluated: {', '.join(counts)}"] + problems
    clients = ", ".join(f"{n} {client(m)}" for n, m in sorted(per_client.items()))
    if len(per_client) > 8:  # phones: ranges, not a thousand names
        clients = f"{len(per_client)} clients, {_range([m['eval_loss'] for m in per_client.values()], '.4f')}"
        if key:
            clients += f", {name} {_range([m[key] for m in per_client.values() if key in m], '.1%')}"
    head = f"{label} loss {summary['eval_loss']:.4f}" + (f", {name} {summary[key]:.1%}" if key else "")
    return [f"{head}  ({clients})"] + problems


def _range(values: list[float], spec: str) -> str:
    return f"{min(values):{spec}} to {max(values):{spec}}" if values else "none"


def evaluation_sample(nodes: list[int], fraction: float, seed: int) -> list[int]:
    """The clients that evaluate (and receive shipped models): all, or a fixed seeded sample.

    With thousands of phones, evaluating every client every round costs more than the
    training; the same sample every round keeps the rounds' losses comparable. It is
    drawn once, whatever the training cohorts are, so it says nothing about who trained.
    """
    if not 0 < fraction <= 1:
        raise UserError("config key 'server.fraction-evaluate': must be in (0, 1]")
    if fraction == 1:
        return nodes
    k = max(1, math.ceil(fraction * len(nodes)))
    return sorted(random.Random(seed).sample(sorted(nodes), k))
