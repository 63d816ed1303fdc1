"""The coordinator's console: one `[fedslm]` line per thing that happened, and the run's closing line."""

from __future__ import annotations


def say(text: str) -> None:
    print(f"[fedslm] {text}", flush=True)


def first_problem(row: dict) -> str:
    """Why a round aggregated nothing, in one line: the first failure, refusal or rejection."""
    for what in ("failed", "refused", "rejected"):
        for entry in row.get(what, []):
            who = f"{entry['client']} " if "client" in entry else "a sampled client "
            return f"{len(row.get(what, []))} of {row['sampled']} sampled {what}, first: {who}{what}: {entry['reason']}"
    if not row.get("sampled"):
        return "no client was sampled"
    return "too few valid updates (see the lines above)"


def closing_line(outcome: dict, planned: int) -> str:
    """The run's last console line: how many rounds trained, not merely ran."""
    trained, idle = outcome["rounds_trained"], outcome["rounds_completed"] - outcome["rounds_trained"]
    text = f"done: {trained} of {planned} rounds trained"
    if idle > 0:
        text += (f" ({idle} round{'s' if idle > 1 else ''} had no usable update: every client failed or refused, "
                 "or too few valid updates)")
    return text + (f" (stopped early: {outcome['stopped']})" if "stopped" in outcome else "")


def trained_line(metrics: dict, privacy: dict) -> str:
    """'train loss 2.1 on 225 records in 3.0s, eps ...', or 'trained on 225 records, eps ...' (DP replies
    carry neither loss nor time: both come from the training records)."""
    loss, seconds = metrics.get("train_loss"), metrics.get("seconds")
    text = f"train loss {loss:.4f} on" if loss is not None else "trained on"
    text += f" {int(metrics['num-examples'])} records" + (f" in {seconds:.1f}s" if seconds is not None else "")
    if "epsilon" in privacy:
        text += f", eps {privacy['epsilon']:.3f} (sigma {privacy['noise_multiplier']:.3f})"
    return text
