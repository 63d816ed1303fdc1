"""What a deployed site answers to an evaluation request: nothing, DP metrics, or metrics of a public file.

Why not clear metrics of held-out records: held-out records are the site's records too,
and evaluation runs on ANY adapter or model the coordinator sends. An adapter crafted to
score one candidate text high turns a clear loss into a membership or reconstruction
oracle, query after query, with no ledger entry. A site cannot tell a crafted adapter from
the federation's aggregate (it never sees the other sites' updates), so checking what it
is sent is not enough: what leaves must be private by itself. Node config ``evaluate``:

- ``off`` (the default): every evaluation request is refused (``Reason.EVALUATION_OFF``).
- ``dp``: each held-out record's loss (the mean over its loss tokens) is clipped to
  [0, L] and, for a task with an accuracy, its correctness (0/1 for a label task, the
  share of its tokens predicted top-1 for next-word) lies in [0, 1]. The released sums
  sum_i loss_i / L and sum_i acc_i each change by at most 1 when one record is added or
  removed, so the pair has L2 sensitivity sqrt(k) (k = 1 or 2 sums) and gets Gaussian
  noise N(0, sigma^2) on each: one Gaussian mechanism with noise multiplier sigma/sqrt(k)
  (Dwork & Roth 2014, Thm A.1 / the analytic form in Balle & Wang 2018 as composed by the
  PRV accountant), charged to the site's ledger as one event at sample rate 1 BEFORE the
  records are read for it. The record count is in clear (as for training). Means are the
  noised sums over n, clamped to their ranges (post-processing). Useful only on large
  held-out sets: the loss mean's noise std is L sigma / n (BENCHMARKS.md).
- ``non-sensitive``: clear metrics, on ``test-data-path`` only, a file the site declares
  non-sensitive (e.g. public questions of the same kind); no ledger charge.

A site with a privacy unit (client.units) releases the same sums over its held-out UNITS:
each unit's value is the mean of its records' clipped values (still in [0, L] and
[0, 1]), so adding or removing a whole unit moves each sum by at most 1 and the charge is
the same Gaussian mechanism, recorded under the ledger's unit; n is the unit count.

Either way: at most ``max-evaluations-per-run`` answers per run id (every answer is a
ledger entry, DP or not, so the count survives processes and is locked), and each entry
records the sha256 of what was evaluated (an audit trail of the adapters and models the
coordinator asked about). A simulation evaluates in clear: its records are the
researcher's own.
"""

from __future__ import annotations

import hashlib
import math

from client.outbound import Refused
from client.units import group_by_unit, training_units
from privacy.mechanism.ledger import LEDGER_FILE, Ledger, fingerprint
from privacy.mechanism.randomness import DpRandom
from privacy.mechanism.record import PrivacyRecord, Reason
from privacy.mechanism.transaction import Grant, Release, SiteBudget, open_release
from slm.evaluate import evaluate

DP_MECHANISM, CLEAR_MECHANISM = "dp-evaluation", "evaluation"
ACCURACY = {"label": "accuracy", "next-word": "top1_accuracy"}  # the one accuracy a DP evaluation releases


def digest_of(arrays) -> str:
    """sha256 over a received ArrayRecord's tensors (names and bytes, sorted): what the ledger records."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name].numpy().tobytes())
    return digest.hexdigest()


class SiteEvaluation:
    """One evaluation request on a deployed site, from admission to the released metrics."""

    def __init__(self, policy, local, request, subject_sha256: str):
        self.policy, self.local, self.request, self.subject = policy, local, request, subject_sha256
        self.grant: Grant | None = None

    def admit(self, task) -> None:
        """Refuse (raise) unless this site evaluates, within its cap; reserve the DP charge first."""
        policy = self.policy
        if policy.evaluate == "off":
            raise Refused(Reason.EVALUATION_OFF, "node config evaluate = off")
        mechanism = DP_MECHANISM if policy.evaluate == "dp" else CLEAR_MECHANISM
        budget = SiteBudget(ledger_dir=policy.ledger_dir, max_epsilon=policy.max_epsilon, delta=policy.delta,
                            max_noise_multiplier=policy.max_noise_multiplier)
        entries = Ledger.load(policy.ledger_dir / LEDGER_FILE).entries if (policy.ledger_dir / LEDGER_FILE).exists() \
            else []
        answered = [e for e in entries if e.run_id == self.request.run_id
                    and e.mechanism in (DP_MECHANISM, CLEAR_MECHANISM) and e.status != "refused"]
        if len(answered) >= policy.max_evaluations:
            raise Refused(Reason.EVALUATION_OFF, f"the run's {policy.max_evaluations} evaluations are used "
                                                     "(node config max-evaluations-per-run)")
        sums = 2 if task.kind in ACCURACY else 1
        release = Release(run_id=self.request.run_id, round=self.request.server_round,
                          clip_norm=policy.evaluation_loss_bound, adapter_sha256=self.subject, mechanism=mechanism,
                          sample_rate=1.0 if mechanism == DP_MECHANISM else 0.0,
                          steps=1 if mechanism == DP_MECHANISM else 0,
                          fixed_sigma=policy.evaluation_noise / math.sqrt(sums) if mechanism == DP_MECHANISM else 0.0,
                          unit=policy.unit.ledger_label)
        units = training_units(policy.unit, self.local.train)
        outcome = open_release(budget, release, fingerprint=fingerprint(self.local.train),
                               records=len(self.local.train) if units is None else len(units))
        if not isinstance(outcome, Grant):
            raise Refused(outcome.reason, outcome.detail)
        self.grant = outcome

    def metrics(self, model, tokenizer, task, on_progress=None) -> dict:
        """The released metrics (after ``admit``), and the charge committed."""
        records = self.local.test
        if self.policy.evaluate == "non-sensitive":
            metrics = evaluate(model, tokenizer, task, records, on_progress=on_progress)
        else:
            metrics = dp_metrics(model, tokenizer, task, records, sigma=self.policy.evaluation_noise,
                                 loss_bound=self.policy.evaluation_loss_bound, rng=DpRandom.fresh(),
                                 unit_field=self.policy.unit.field)
        self.grant.commit()
        return metrics

    def record(self) -> PrivacyRecord:
        e = self.grant.entry
        return PrivacyRecord(client=self.policy.name, status="committed", mechanism=e.mechanism,
                             noise_multiplier=e.noise_multiplier, clip_norm=e.clip_norm, sample_rate=e.sample_rate,
                             steps=e.steps, delta=e.delta, epsilon=e.epsilon_after, epsilon_rdp=e.epsilon_rdp_after,
                             max_epsilon=e.max_epsilon, records=len(self.local.test),
                             **self.policy.unit.record_fields())


def dp_metrics(model, tokenizer, task, records: list[dict], *, sigma: float, loss_bound: float,
               rng: DpRandom, unit_field: str = "") -> dict:
    """Noised mean loss (and the task's accuracy) over ``records``' units (each record its own unit when
    ``unit_field`` is ''): sums of per-unit values, see the module."""
    losses, correct = 0.0, 0.0
    accuracy_key = ACCURACY.get(task.kind)
    units = group_by_unit(records, unit_field, "the site's held-out records")
    for unit in units:  # one record at a time: each one's own mean loss, clipped; then the unit's mean
        unit_loss, unit_correct = 0.0, 0.0
        for i in unit:
            one = evaluate(model, tokenizer, task, [records[i]])
            unit_loss += min(max(one["eval_loss"], 0.0), loss_bound) / loss_bound
            if accuracy_key:
                unit_correct += min(max(one[accuracy_key], 0.0), 1.0)
        losses += unit_loss / len(unit)
        correct += unit_correct / len(unit)
    n = max(len(units), 1)
    noise = rng.normal((2,), sigma)
    mean_loss = min(max((losses + noise[0]) * loss_bound / n, 0.0), loss_bound)
    metrics = {"eval_loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0)), "eval_tokens": float(n),
               "eval_examples": float(n), "dp_noise_std": sigma * loss_bound / n}
    if accuracy_key:
        metrics[accuracy_key] = min(max((correct + noise[1]) / n, 0.0), 1.0)
    return metrics
