"""A site's round transaction: open the ledger, apply the site's rules, decide sigma, reserve.

One call, ``open_release``, returns a ``Grant`` (sigma, and a reservation on disk that
counts from now on) or a ``Refusal`` (a ``Reason`` and the detail for the site's log).
The caller trains only with a grant and commits it after training; a crash in between
leaves the reservation, which counts (privacy.mechanism.ledger).

The order is the point: everything the coordinator sent is parsed and bounded BEFORE this
is called (client.request), so a request that cannot be honoured never reaches the
ledger, and a round that trains nothing can never spend budget.

Two kinds of release go through it: a DP-SGD round (sigma calibrated against what is left
of the budget, privacy.mechanism.policy.decide) and a DP evaluation (sigma fixed by the
site, one Gaussian mechanism over its held-out records: sample rate 1, one step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from privacy.mechanism.ledger import Entry, Ledger
from privacy.mechanism.policy import decide, default_delta
from privacy.mechanism.record import REFUSED, Reason


@dataclass(frozen=True)
class SiteBudget:
    """What the site decided for itself (its node config): the only inputs that set the budget."""

    ledger_dir: Path
    max_epsilon: float
    delta: float  # 0 = min(1e-5, 0.1 / records), fixed when the ledger is created
    max_noise_multiplier: float


@dataclass(frozen=True)
class Release:
    """One release the coordinator asked for, already parsed and bounded by the site."""

    run_id: str
    round: int
    clip_norm: float
    sample_rate: float
    steps: int
    requested_sigma: float = 0.0  # a floor: more noise is honoured, less is overruled
    target_epsilon: float = 0.0  # can only lower the budget
    rounds_left: int = 1
    fixed_sigma: float | None = None  # a DP evaluation: the site's own sigma, no calibration
    mechanism: str = "dp-sgd"
    adapter_sha256: str = ""  # the adapter the release starts from (audit trail)
    unit: str = "record"  # whom it protects (client.units.PrivacyUnit.ledger_label); q is taken over these
    records_per_unit: int = 1  # unit-level: most records of one unit in one step
    group_records: int = 0  # record-level with the site's group-field: the most records of one person


@dataclass(frozen=True)
class Grant:
    ledger: Ledger
    entry: Entry  # status reserved, on disk

    @property
    def noise_multiplier(self) -> float:
        return self.entry.noise_multiplier

    def commit(self) -> Entry:
        return self.ledger.commit(self.entry)


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    detail: str  # for the site's own log; never sent from a deployed site
    ledger: Ledger | None = None
    entry: Entry | None = None  # the refusal as recorded in the ledger (None: nothing written)


def open_release(budget: SiteBudget, release: Release, *, fingerprint: str, records: int) -> Grant | Refusal:
    """Reserve ``release`` in the site's ledger, or say why not (recorded in the ledger when it got that far).

    ``records`` counts the release's privacy units (records, or units of the site's unit field).
    """
    ledger = Ledger.open(budget.ledger_dir, fingerprint=fingerprint, records=records,
                         delta=budget.delta or default_delta(records), unit=release.unit)
    entry = Entry(run_id=release.run_id, round=release.round, noise_multiplier=0.0, clip_norm=release.clip_norm,
                  sample_rate=release.sample_rate, steps=release.steps, delta=ledger.delta, epsilon_after=0.0,
                  epsilon_rdp_after=0.0, max_epsilon=budget.max_epsilon, status="", mechanism=release.mechanism,
                  adapter_sha256=release.adapter_sha256, unit=release.unit, records_per_unit=release.records_per_unit,
                  group_records=release.group_records)
    site_rule = _site_rules(ledger, budget)
    if site_rule is not None:
        reason, detail = site_rule
        return Refusal(reason, detail, ledger, ledger.refuse(entry, detail))
    if release.fixed_sigma is not None:
        sigma = release.fixed_sigma
    else:
        decision = decide(ledger, max_epsilon=budget.max_epsilon, requested_sigma=release.requested_sigma,
                          target_epsilon=release.target_epsilon, sample_rate=release.sample_rate,
                          steps=release.steps, rounds_left=release.rounds_left,
                          max_noise_multiplier=budget.max_noise_multiplier)
        if decision.refused:
            return Refusal(Reason.BUDGET, decision.reason, ledger, ledger.refuse(entry, decision.reason))
        sigma = decision.noise_multiplier
    entry = ledger.reserve(replace(entry, noise_multiplier=sigma), budget=budget.max_epsilon)
    if entry.status == REFUSED:  # re-checked under the lock: data changed meanwhile, or past + this > budget
        reason = Reason.DATA_CHANGED if ledger.data_changed else Reason.BUDGET
        return Refusal(reason, entry.reason, ledger, entry)
    return Grant(ledger, entry)


def _site_rules(ledger: Ledger, budget: SiteBudget) -> tuple[Reason, str] | None:
    """Site-side reasons not to release at all (checked again under the ledger's lock by reserve)."""
    if ledger.data_changed:
        return Reason.DATA_CHANGED, ledger.data_change_reason()
    if ledger.delta * ledger.records >= 1:
        return Reason.INTERNAL, (f"delta {ledger.delta:g} is not below 1/{ledger.unit} count (1/{ledger.records}): "
                                 "such a guarantee allows publishing one outright")
    if ledger.path.exists() and budget.delta and budget.delta != ledger.delta:
        return Reason.INTERNAL, (f"the site's delta {budget.delta:g} differs from its ledger's {ledger.delta:g}, "
                                 "fixed when the ledger was created; keep the ledger's delta or start a new ledger "
                                 "directory deliberately")
    return None
