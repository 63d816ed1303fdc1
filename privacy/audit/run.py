"""The empirical privacy audit: train with canaries, measure what leaks, test the reported epsilon.

What is audited: ONE client's local DP-SGD training, i.e. the mechanism whose
sample-level (epsilon, delta) the client's ledger reports, with the client's own training
code (``train``: client.train.train_adapter, injected by the caller so that this module
stays below ``client`` in the import order, and so that a test can inject a broken one).
A federation adds nothing to the sample-level guarantee of a client (the server only
post-processes its updates), so one local run is the honest unit, and a cheap one.

One audit = one canary set (privacy.audit.canaries: m random secrets, each included with
probability 1/2) and several trials on the same training data, each from the same
initial adapter:

- sigma = 0 (clipping, no noise): no guarantee; the audit must see the canaries leak,
  or it could not have caught anything;
- DP at each target epsilon: sigma calibrated by privacy.mechanism.calibrate for the realised
  sample rate and steps, epsilon reported by privacy.mechanism.accountant (PRV). The one-run lower
  bound (privacy.audit.one_run_bound, confidence 1 - beta) must not exceed it.

The training data of a trial is ``base_records`` (real records, optional) plus the
included canaries, so the sample rate q = batch / records depends on how many went in,
exactly as a real client's q depends on its record count: the accountant treats q as
public, which for neighbouring data sets (one record more or less) is off by a factor
(N+1)/N. Every trial reports the q it ran with. Each trial's bound holds with
probability 1 - beta on its own.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from privacy.audit import one_run_bound
from privacy.audit.canaries import (
    PROMPT,
    CanarySet,
    candidate_secrets,
    digit_token_ids,
    exposure,
    log_perplexities,
    make_canaries,
    score_canaries,
    summarize,
)
from privacy.audit.doc import SCHEMA, verdict
from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.calibrate import noise_for_budget
from privacy.mechanism.policy import default_delta
from slm.lora import adapter_state, frozen_a_factors, set_adapter_state
from slm.tasks import Task, encode

BOUND_METHOD = ("Steinke, Nasr & Jagielski, 'Privacy Auditing with One (1) Training Run', NeurIPS 2023 "
                "(arXiv:2305.08846): main result for (eps, delta)-DP, P[W >= v] <= f(v) + 2 m delta max_i "
                "(f(v-i) - f(v))/i with f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v], p-value as in the authors' "
                "published code; bound = largest eps rejected at level beta / |grid| for each guessing in a grid "
                "fixed in advance (Bonferroni), the largest over the grid.")
EXPOSURE_METHOD = ("Carlini, Liu, Erlingsson, Kos & Song, 'The Secret Sharer', USENIX Security 2019: exposure = "
                   "log2|R| - log2 rank by log-perplexity among all secrets of R put in the same record; rank "
                   "estimated from n secrets sampled uniformly from R: sampled = -log2((c+1)/(n+1)), c = sampled "
                   "secrets at or below the canary's log-perplexity (at most log2(n+1)); extrapolated = -log2 of "
                   "a skew-normal CDF fitted to the sampled log-perplexities (at most log2|R|).")
SCORE_METHOD = ("the digit log-likelihood ratio under the trained adapter: mean over the secret's "
                "digits of log p(its digit) - mean over the ten digits d of log p(d), given the record and the digits "
                "before (0 in expectation for a secret the model never saw); guess 'in' for the highest scores, "
                "'out' for the lowest. The drop of the loss during training is reported too, but not used.")


@dataclass(frozen=True)
class AuditSpec:
    """What an audit does; validated here, so the CLI and tests share the checks."""

    canaries: int = 128  # m
    digits: int = 8  # secret length: |R| = 10^digits
    steps: int = 160
    batch_size: int = 8  # expected Poisson batch
    lr: float = 0.01
    clip_norm: float = 1.0
    epsilons: tuple[float, ...] = (8.0,)  # one DP trial per target
    baseline: bool = True  # also the sigma = 0 trial
    beta: float = 0.05
    candidates: int = 127  # n sampled secrets per exposure
    exposure_canaries: int = 8  # per group (inserted / not inserted)
    seed: int = 0

    def __post_init__(self):
        if self.canaries < 4:
            raise ValueError("canaries: at least 4")
        if self.digits < 2:
            raise ValueError("digits: at least 2")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size: at least 1")
        if not self.lr > 0 or not self.clip_norm > 0:
            raise ValueError("learning rate and clip norm must be positive")
        if any(not e > 0 or not math.isfinite(e) for e in self.epsilons):
            raise ValueError(f"target epsilons must be positive and finite, got {list(self.epsilons)}")
        if not self.epsilons and not self.baseline:
            raise ValueError("nothing to run: no target epsilon and no sigma=0 baseline")
        if not 0 < self.beta < 1:
            raise ValueError("beta must be in (0, 1)")
        if self.candidates < 2 or self.exposure_canaries < 0:
            raise ValueError("exposure: at least 2 candidates, and a non-negative number of canaries")


def run_audit(model, tokenizer, task: Task, spec: AuditSpec, *, train: Callable, freeze_a: bool,
              base_records: Sequence[dict] = (), delta: float | None = None, describe: dict | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run every trial of ``spec`` on ``model`` (restored to its current adapter after each); the audit document.

    :param train: ``train(model, tokenizer, task, records, *, steps, batch_size, lr, noise_multiplier,
        clip_norm, seed)`` with client.train.train_adapter's contract (None = no DP, 0.0 = clip only)
    :param delta: the delta of every DP claim (and of the bound); None: the client's policy for the
        records it trains on (privacy.mechanism.policy.default_delta)
    :param freeze_a: train only the B factors, as the FFA-LoRA client does under DP
    :param describe: facts for the document (model, lora, ...) that this module cannot know
    """
    started = time.time()
    canaries = make_canaries(spec.canaries, digits=spec.digits, seed=spec.seed)
    _check_fits(tokenizer, task, canaries)
    records = list(base_records) + [canaries.record(task, i) for i in canaries.inserted()]
    if len(records) < spec.batch_size:
        raise ValueError(f"only {len(records)} training records for an expected batch of {spec.batch_size}: "
                         "use more canaries or base records")
    q = spec.batch_size / len(records)
    delta = default_delta(len(records)) if delta is None else delta
    initial = adapter_state(model)
    before = score_canaries(model, tokenizer, task, canaries)  # (losses, scores) of the initial adapter
    chosen = _exposure_subset(canaries, spec.exposure_canaries, spec.seed)
    trials = []
    plan = ([None] if spec.baseline else []) + list(spec.epsilons)
    for number, target in enumerate(plan):
        sigma = 0.0 if target is None else noise_for_budget(
            [], budget=target, sample_rate=q, steps_per_round=spec.steps, rounds_left=1, delta=delta)
        if sigma is None:
            raise ValueError(f"target epsilon {target:g}: not reachable with sigma <= 64 at q={q:.4f}, "
                             f"{spec.steps} steps, delta={delta:g}")
        log(f"trial {number + 1}/{len(plan)}: " + ("sigma=0 (clipping, no noise)" if target is None else
                                                   f"DP, target eps {target:g}: sigma {sigma:.3f}")
            + f", {spec.steps} steps at q={q:.4f} on {len(records)} records")
        try:
            trials.append(_trial(model, tokenizer, task, spec, canaries, records, q, sigma, target, delta, before,
                                 chosen, train, freeze_a, _seed(spec.seed, number)))
        finally:
            set_adapter_state(model, initial)
        log(_trial_line(trials[-1]))
    return {
        "schema": SCHEMA,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "unit": "one client's local DP-SGD training (the canary client); sample-level DP, neighbouring data "
                "sets differ by one record (add / remove)",
        **(describe or {}),
        "frozen_a": freeze_a,
        "max_length": task.max_length,
        "canaries": {"count": spec.canaries, "inserted": len(canaries.inserted()), "inclusion_probability": 0.5,
                     "digits": spec.digits, "space_log2": canaries.space_log2,
                     "format": PROMPT.format(key="<4 random letters>") + f" -> <{spec.digits} random digits>",
                     "seed": spec.seed, "included": list(canaries.included),
                     "loss_initial": summarize(before[0]), "score_initial": summarize(before[1])},
        "training": {"records": len(records), "base_records": len(base_records),
                     "canary_records": len(canaries.inserted()), "steps": spec.steps, "batch_size": spec.batch_size,
                     "sample_rate": q, "sampling": "poisson", "lr": spec.lr, "optimizer": "Adam",
                     "clip_norm": spec.clip_norm,
                     "trainer": "client.train.train_adapter (Opacus DP-SGD, the client's own code)"},
        "method": {"score": SCORE_METHOD, "bound": BOUND_METHOD, "exposure": EXPOSURE_METHOD,
                   "beta": spec.beta, "candidates": spec.candidates,
                   "exposure_canaries": {"inserted": sum(canaries.included[i] for i in chosen),
                                         "not_inserted": sum(not canaries.included[i] for i in chosen)}},
        "spec": asdict(spec),
        "trials": trials,
        "seconds": time.time() - started,
    }


def _trial(model, tokenizer, task, spec, canaries: CanarySet, records, q, sigma, target, delta, before, chosen,
           train, freeze_a, seed) -> dict:
    started = time.time()
    with frozen_a_factors(model, freeze=freeze_a):
        result = train(model, tokenizer, task, records, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                       noise_multiplier=sigma, clip_norm=spec.clip_norm, seed=seed)
    trained = time.time()
    after, scores = score_canaries(model, tokenizer, task, canaries)
    drops = [b - a for b, a in zip(before[0], after)]
    bound = one_run_bound.audit(scores, canaries.included, beta=spec.beta, delta=delta)
    scored = time.time()
    exposures = _exposures(model, tokenizer, task, canaries, chosen, spec.candidates) if chosen else []
    event = [SgmEvent(noise_multiplier=sigma, sample_rate=q, steps=spec.steps)]
    reported = epsilon(event, delta=delta)
    trial = {
        "name": "sigma=0 (clipping, no noise)" if target is None else f"DP, target eps {target:g}",
        "target_epsilon": target, "noise_multiplier": sigma, "clip_norm": spec.clip_norm, "sample_rate": q,
        "steps": spec.steps, "delta": delta,
        "epsilon": reported if math.isfinite(reported) else None,
        "epsilon_rdp": epsilon(event, delta=delta, accountant="rdp") if sigma > 0 else None,
        "accountant": "prv", "train_loss": result.loss,
        "membership": {"score": "digit log-likelihood ratio (nats)",
                       **_groups(scores, canaries.included), "per_canary": scores,
                       "loss_drop": _groups(drops, canaries.included), "loss_after": after},
        "bound": bound,
        "exposure": _exposure_doc(canaries, chosen, exposures) if chosen else None,
        "seconds": {"train": trained - started, "score": scored - trained, "exposure": time.time() - scored},
    }
    trial["verdict"] = verdict(trial)
    return trial


def _groups(values: list[float], included: Sequence[bool]) -> dict:
    return {"inserted": summarize([v for v, inc in zip(values, included) if inc]),
            "not_inserted": summarize([v for v, inc in zip(values, included) if not inc])}


def _check_fits(tokenizer, task: Task, canaries: CanarySet) -> None:
    """A truncated canary would hide its key or secret: ask for a longer model.max-length instead."""
    digit_token_ids(tokenizer)  # secrets need one token per digit
    wide = Task(kind=task.kind, max_length=10_000, prompt_field=task.prompt_field, response_field=task.response_field)
    full, kept = encode(wide, tokenizer, canaries.record(task, 0)), encode(task, tokenizer, canaries.record(task, 0))
    if full.input_ids != kept.input_ids:
        need = max(len(full.input_ids), 2 * (len(full.input_ids) - sum(t != -100 for t in full.labels)) + 2)
        raise ValueError(f"a canary is {len(full.input_ids)} tokens and would be truncated at model.max-length "
                         f"{task.max_length}; set model.max-length to at least {need}")


def _exposure_subset(canaries: CanarySet, per_group: int, seed: int) -> list[int]:
    """Up to ``per_group`` inserted and as many not-inserted canaries, drawn with the audit's seed."""
    draw = random.Random(f"fedslm-exposure/{seed}")
    inside = canaries.inserted()
    outside = [i for i in range(len(canaries.included)) if not canaries.included[i]]
    return sorted(draw.sample(inside, min(per_group, len(inside))) + draw.sample(outside, min(per_group, len(outside))))


def _exposures(model, tokenizer, task, canaries: CanarySet, chosen: list[int], n: int):
    out = []
    for i in chosen:
        px = log_perplexities(model, tokenizer, task, canaries.record(task, i),
                              [canaries.secrets[i]] + candidate_secrets(canaries, i, n))
        out.append(exposure(px[0], px[1:], canaries.space_log2))
    return out


def _exposure_doc(canaries: CanarySet, chosen: list[int], exposures) -> dict:
    rows = [{"canary": i, "included": canaries.included[i], "sampled": e.sampled, "extrapolated": e.extrapolated,
             "log_perplexity": e.log_perplexity} for i, e in zip(chosen, exposures)]
    groups = {}
    for name, flag in (("inserted", True), ("not_inserted", False)):
        group = [r for r in rows if r["included"] == flag]
        groups[name] = {"sampled": summarize([r["sampled"] for r in group]),
                        "extrapolated": summarize([r["extrapolated"] for r in group])}
    return {"space_log2": canaries.space_log2, "candidates": exposures[0].candidates,
            "sampled_max": math.log2(exposures[0].candidates + 1), **groups, "per_canary": rows}


def _trial_line(trial: dict) -> str:
    bound, exp = trial["bound"], trial["exposure"]
    text = (f"  train loss {trial['train_loss']:.3f}; eps lower bound {bound['epsilon_lower']:.3f} "
            f"({bound['best']['correct']}/{bound['best']['guesses']} guesses right)")
    if exp:
        text += (f"; mean exposure inserted {_bits(exp['inserted'])}, not inserted {_bits(exp['not_inserted'])}")
    eps = "inf" if trial["epsilon"] is None else f"{trial['epsilon']:.3f}"
    return text + f"; reported eps {eps}: {trial['verdict']}"


def _bits(group: dict) -> str:
    if not group["sampled"]["count"]:
        return "-"
    return f"{group['extrapolated']['mean']:.1f} bits (sampled {group['sampled']['mean']:.1f})"


def _seed(seed: int, trial: int) -> int:
    """Training seed of a trial (sampling and noise): fixed by the audit's seed, for a reproducible audit."""
    return int(hashlib.sha256(f"fedslm-audit/{seed}/{trial}".encode()).hexdigest()[:15], 16)
