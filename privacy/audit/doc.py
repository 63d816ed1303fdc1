"""The audit document (audit.json, ``SCHEMA``): verdicts, plain words, and reading it back for the report.

Light on purpose (no torch): ``fedslm report`` reads ``<run>/audit.json`` through here.
A field never changes meaning; new ones are added. Infinite epsilons (sigma = 0) are
written as null.
"""

from __future__ import annotations

from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import read_json

SCHEMA = "fedslm-audit/1"
VERDICTS = {
    "consistent": "the lower bound does not exceed the reported epsilon: no evidence of a bug",
    "violation": "VIOLATION: the lower bound exceeds the reported epsilon, so the mechanism or its accounting is "
                 "broken (the reported guarantee is false, with the stated confidence)",
    "leaks": "no guarantee claimed, and the canaries measurably leaked (as they must without noise)",
    "no leak detected": "no guarantee claimed, yet the attack found no leak: the audit has no power in this "
                        "setting, so its results for the DP trials show nothing",
}
CAVEAT = ("A lower bound is what this attack proves at the stated confidence, not the true epsilon, which can be "
          "much larger (a stronger attack, or an adversary who sees every step, may prove more). Only a lower bound "
          "above the reported epsilon would indicate a bug.")


def verdict(trial: dict) -> str:
    """One of ``VERDICTS``: compares the trial's lower bound with its reported epsilon (None = no DP)."""
    lower = trial["bound"]["epsilon_lower"]
    if trial["epsilon"] is None:
        return "leaks" if lower > 0 else "no leak detected"
    return "violation" if lower > trial["epsilon"] else "consistent"


def read_audit(run_dir: str | Path) -> dict | None:
    """``<run_dir>/audit.json`` when an audit was written there, else None."""
    path = Path(run_dir) / "audit.json"
    if not path.exists():
        return None
    doc = read_json(path, "audit")
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("fedslm-audit/"):
        raise UserError(f"audit {path}: not a fedslm audit (schema {doc.get('schema') if isinstance(doc, dict) else None!r})")
    return doc


def setup_sentence(doc: dict) -> str:
    c, t = doc["canaries"], doc["training"]
    base = f" and {t['base_records']} real records" if t["base_records"] else ""
    return (f"Empirical audit: {c['count']} canaries (records '{c['format']}', secrets from a space of "
            f"2^{c['space_log2']:.1f}) were each put into one client's training data with probability 1/2 "
            f"({c['inserted']} were); that client trained alone on them{base} ({t['records']} records) with its own "
            f"DP-SGD code: {t['steps']} steps, Poisson sample rate {t['sample_rate']:.4f} (expected batch "
            f"{t['batch_size']}), learning rate {t['lr']:g}, clip norm {t['clip_norm']:g}"
            + (", LoRA A frozen (FFA-LoRA)" if doc.get("frozen_a") else "") + ". Each trial started from the "
            "same initial adapter; the audit trains its own copy and does not touch any run's model.")


def trial_sentence(trial: dict) -> str:
    bound = trial["bound"]
    best = bound["best"]
    confidence = f"{1 - bound['beta']:.0%}"
    text = (f"{_setting(trial)}: the lower bound is eps >= {bound['epsilon_lower']:.2f} at {confidence} confidence "
            f"({best['correct']} of {best['guesses']} membership guesses right")
    exp = trial.get("exposure")
    if exp and exp["inserted"]["sampled"]["count"] and exp["not_inserted"]["sampled"]["count"]:
        text += (f"; mean exposure of inserted canaries {exp['inserted']['extrapolated']['mean']:.1f} bits "
                 f"extrapolated ({exp['inserted']['sampled']['mean']:.1f} sampled, at most "
                 f"{exp['sampled_max']:.1f}), of canaries left out {exp['not_inserted']['extrapolated']['mean']:.1f}"
                 f" ({exp['not_inserted']['sampled']['mean']:.1f})")
    text += f"): {VERDICTS[trial['verdict']]}"
    if trial["epsilon"] is not None and not can_refute(trial):
        text += (f"; but with {bound['canaries']} canaries even a perfect attack proves at most "
                 f"eps >= {bound['max_provable']:.2f}, so a violation at this epsilon was out of this audit's reach")
    return text + "."


def can_refute(trial: dict) -> bool:
    """Whether this audit could have shown a lower bound above the trial's reported epsilon at all."""
    return trial["epsilon"] is not None and trial["bound"]["max_provable"] > trial["epsilon"]


def _setting(trial: dict) -> str:
    if trial["epsilon"] is None:
        return f"Without noise (sigma = {trial['noise_multiplier']:g}, clipping only)"
    return (f"With DP (sigma = {trial['noise_multiplier']:.3f}, reported (eps, delta) = "
            f"({trial['epsilon']:.2f}, {trial['delta']:.3g}))")


def audit_sentences(doc: dict) -> list[str]:
    """The audit in plain words: setup, one sentence per trial, the caveat."""
    return [setup_sentence(doc)] + [trial_sentence(t) for t in doc["trials"]] + [CAVEAT]


def summary_sentence(doc: dict) -> str:
    """One sentence for the report's summary."""
    dp = [t for t in doc["trials"] if t["epsilon"] is not None]
    broken = [t for t in dp if t["verdict"] == "violation"]
    if broken:
        return (f"WARNING: the empirical audit found a lower bound above the reported epsilon in {len(broken)} trial(s) "
                "(see 'Empirical audit'): the privacy claim is false.")
    baseline = [t for t in doc["trials"] if t["epsilon"] is None]
    leak = (f"without noise the canaries leaked (lower bound {baseline[0]['bound']['epsilon_lower']:.2f})"
            if baseline and baseline[0]["verdict"] == "leaks" else
            "without noise the attack found no leak, so it shows nothing" if baseline else "")
    checks = "; ".join(f"at reported eps {t['epsilon']:.2f} the lower bound is {t['bound']['epsilon_lower']:.2f}"
                       + ("" if can_refute(t) else f" (it could not exceed {t['bound']['max_provable']:.2f})")
                       for t in dp)
    return ("An empirical audit with canaries found no contradiction with the reported epsilons: "
            + "; ".join(part for part in (checks, leak) if part) + ".")
