"""Every epsilon in a report, recomputed from the stored events and checked against what was reported.

A client reports a cumulative epsilon with each reply, and the server stores it; the
report never repeats that number on trust. It recomputes epsilon from the DP-SGD events
(sigma, sample rate, steps) with privacy.mechanism.accountant and compares:

- with the client's own ledger (simulation, or a hospital reading its own disk): the
  cumulative epsilon after each round composes every spend in the ledger up to that
  round, earlier runs on the same data and crashed reservations included, exactly as the
  client computed it; any difference is a disagreement;
- with only the server's view (a deployment): the events of this run are all there is.
  A reported epsilon BELOW the recomputed one is a disagreement; one ABOVE it is what a
  client with earlier spend (other runs) reports, so the report takes the larger,
  reported number and says it could not be recomputed from this run's files.

Same events give the same number to the last bit on one installation, and to 2e-9 relative
across NumPy/SciPy builds (measured, BENCHMARKS.md 19); a difference above ``TOLERANCE``
means another history or another accountant version.

All of these are add/remove-one-record epsilons; each account also carries the
replace-one epsilon of the same events (privacy.report.neighbouring), None where the
events behind the total are not all in this run's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.ledger import SPENDING, Ledger
from privacy.report.neighbouring import epsilon_group, epsilon_replace_one

TOLERANCE = 1e-3


@lru_cache(maxsize=None)
def _epsilon(events: tuple[SgmEvent, ...], delta: float, accountant: str) -> float:
    return epsilon(events, delta=delta, accountant=accountant)


def _eps_pair(events: list[SgmEvent], delta: float) -> tuple[float, float]:
    return _epsilon(tuple(events), delta, "prv"), _epsilon(tuple(events), delta, "rdp")


def _event(record: dict) -> SgmEvent:
    return SgmEvent(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"],
                    steps=record["steps"])


@dataclass
class ClientAccount:
    """One client's sample-level privacy in this run, recomputed. Epsilons are cumulative (lifetime)."""

    name: str
    dp: bool
    records: int | None
    delta: float | None
    budget: float | None
    rounds: list[dict]  # per round: the server-view record + recomputed "epsilon", "epsilon_rdp"
    epsilon: float  # after this run's last round, everything the client has spent on this data
    epsilon_rdp: float
    epsilon_run: float  # this run's spend alone
    epsilon_run_rdp: float
    epsilon_before: float  # spent on this data before this run; nan = some, but only the client's ledger knows
    source: str  # where the events came from
    recomputable: bool = True  # False: the total was reported by the client, not recomputed
    disagreements: list[str] = field(default_factory=list)
    events: list[SgmEvent] = field(default_factory=list)  # what ``epsilon`` composes (when recomputable)
    run_events: list[SgmEvent] = field(default_factory=list)  # what ``epsilon_run`` composes
    # replace-one neighbouring (privacy.report.neighbouring), same delta; None where the events are not all here
    epsilon_replace_one: float | None = None
    epsilon_run_replace_one: float | None = None
    # whom the epsilons protect (client.units): "record", or the site's word for a unit ("patient")
    unit: str = "record"
    records_per_unit: int = 1  # unit-level: most records of one unit in one step
    units: int | None = None  # unit-level: how many units trained
    group_records: int = 0  # record-level with a group field (simulation): the most records of one person
    epsilon_group: float | None = None  # what epsilon means for that person (privacy.report.neighbouring)

    @property
    def unit_level(self) -> bool:
        return self.unit != "record"

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else max(self.budget - self.epsilon, 0.0)

    @property
    def refused(self) -> list[dict]:
        return [{"round": r["round"], "reason": r.get("reason", "")} for r in self.rounds if r["status"] == "refused"]


def account_client(name: str, records: list[dict], ledger: Ledger | None, run_id: str) -> ClientAccount:
    rounds = sorted(records, key=lambda r: r["round"])
    last = rounds[-1] if rounds else {}
    if not rounds or any(r.get("status") == "no-dp" or r.get("dp") is False for r in rounds):
        return ClientAccount(name=name, dp=False, records=last.get("records"), delta=None, budget=None,
                             rounds=[{**r, "epsilon": math.inf, "epsilon_rdp": math.inf} for r in rounds],
                             epsilon=math.inf, epsilon_rdp=math.inf, epsilon_run=math.inf, epsilon_run_rdp=math.inf,
                             epsilon_before=0.0, source="server view (no DP)")
    try:
        account = _from_ledger(name, rounds, ledger, run_id) if ledger is not None else _from_view(name, rounds)
    except (KeyError, TypeError, ValueError) as err:
        return _unreadable(name, rounds, f"{name}: privacy record unreadable ({err}); no epsilon recomputed")
    account.epsilon_run_replace_one = epsilon_replace_one(account.run_events, delta=account.delta)
    if account.recomputable:
        account.epsilon_replace_one = epsilon_replace_one(account.events, delta=account.delta)
        if not account.unit_level and account.group_records > 1:
            account.epsilon_group = epsilon_group(account.events, delta=account.delta, group=account.group_records)
    return account


def _from_ledger(name: str, rounds: list[dict], ledger: Ledger, run_id: str) -> ClientAccount:
    entries = ledger.entries
    mine = [i for i, e in enumerate(entries) if e.run_id == run_id]
    spending = [e.event() if e.status in SPENDING else None for e in entries]

    def upto(index: int) -> list[SgmEvent]:
        return [ev for ev in spending[:index + 1] if ev is not None]

    account = _base(name, rounds, ledger.delta, source=f"client ledger {ledger.path}")
    for row in account.rounds:
        matches = [i for i in mine if entries[i].round == row["round"]]
        if not matches:
            account.disagreements.append(f"{name} round {row['round']}: not in the client's ledger {ledger.path}")
            row["epsilon"] = row["epsilon_rdp"] = math.nan
            continue
        index = matches[-1]
        if row["status"] in SPENDING and entries[index].event() != _event(row):
            account.disagreements.append(f"{name} round {row['round']}: the server's record {_event(row)} differs "
                                         f"from the client's ledger {entries[index].event()}")
        row["epsilon"], row["epsilon_rdp"] = _eps_pair(upto(index), ledger.delta)
        _compare(account, row, outside_spend_possible=False)
    account.events = upto(mine[-1])
    account.epsilon, account.epsilon_rdp = _eps_pair(account.events, ledger.delta)
    account.epsilon_before = _eps_pair(upto(mine[0] - 1), ledger.delta)[0]
    account.run_events = [spending[i] for i in mine if spending[i] is not None]
    account.epsilon_run, account.epsilon_run_rdp = _eps_pair(account.run_events, ledger.delta)
    return account


def _from_view(name: str, rounds: list[dict]) -> ClientAccount:
    delta = rounds[-1]["delta"]
    account = _base(name, rounds, delta, source="server view (privacy/ledger.json)")
    events = []
    for row in account.rounds:
        if row["status"] in SPENDING:
            events.append(_event(row))
        row["epsilon"], row["epsilon_rdp"] = _eps_pair(events, delta)
        _compare(account, row, outside_spend_possible=True)
    account.epsilon_run, account.epsilon_run_rdp = _eps_pair(events, delta)
    account.epsilon, account.epsilon_rdp = account.epsilon_run, account.epsilon_run_rdp
    account.events, account.run_events = list(events), list(events)
    if any(r.get("reported_outside_spend") for r in account.rounds):
        # epsilons do not subtract: the earlier spend itself is unknown here, only that there was some
        last = account.rounds[-1]
        account.recomputable = False
        account.epsilon = max(account.epsilon, last["epsilon_reported"] or 0.0)
        account.epsilon_rdp = max(account.epsilon_rdp, last["epsilon_rdp_reported"] or 0.0)
        account.epsilon_before = math.nan
        account.events = []  # the earlier spend's events are not in this run's files
    return account


def _base(name: str, rounds: list[dict], delta: float, source: str) -> ClientAccount:
    last = rounds[-1]
    if any(r["delta"] != delta for r in rounds):
        raise ValueError(f"records state delta {sorted({r['delta'] for r in rounds})}, expected {delta} throughout")
    rows = [{"round": r["round"], "status": r["status"], "noise_multiplier": r["noise_multiplier"],
             "clip_norm": r["clip_norm"], "sample_rate": r["sample_rate"], "steps": r["steps"],
             "epsilon_reported": r.get("epsilon"), "epsilon_rdp_reported": r.get("epsilon_rdp"),
             "reason": r.get("reason", ""), "noise_seed": r.get("noise_seed"),
             "noise_generator": r.get("noise_generator")} for r in rounds]
    return ClientAccount(name=name, dp=True, records=last.get("records"), delta=delta, budget=last.get("max_epsilon"),
                         rounds=rows, epsilon=0.0, epsilon_rdp=0.0, epsilon_run=0.0, epsilon_run_rdp=0.0,
                         epsilon_before=0.0, source=source, unit=last.get("unit", "record"),
                         records_per_unit=last.get("records_per_unit", 1), units=last.get("units") or None,
                         group_records=last.get("group_records", 0))


def _compare(account: ClientAccount, row: dict, *, outside_spend_possible: bool) -> None:
    reported = row["epsilon_reported"]
    if reported is None or math.isclose(reported, row["epsilon"], rel_tol=TOLERANCE, abs_tol=TOLERANCE):
        row["agrees"] = reported is not None
        return
    row["agrees"] = False
    if outside_spend_possible and reported > row["epsilon"]:
        row["reported_outside_spend"] = True
        return
    account.disagreements.append(f"{account.name} round {row['round']}: reported eps {reported:.4f}, "
                                 f"recomputed {row['epsilon']:.4f}")


def _unreadable(name: str, rounds: list[dict], why: str) -> ClientAccount:
    return ClientAccount(name=name, dp=True, records=None, delta=None, budget=None, rounds=[], epsilon=math.nan,
                         epsilon_rdp=math.nan, epsilon_run=math.nan, epsilon_run_rdp=math.nan,
                         epsilon_before=math.nan, source="unreadable", recomputable=False, disagreements=[why])


@dataclass
class UserLevelAccount:
    """Whole-client DP-FedAvg on the server (server.user_dp), recomputed per round."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    delta: float
    rounds: list[dict]
    epsilon: float
    disagreements: list[str] = field(default_factory=list)


def account_user_level(rows: list[dict]) -> UserLevelAccount | None:
    records = [r["user_dp"] for r in rows if r.get("user_dp")]
    if not records:
        return None
    delta, events, out, disagreements = records[-1]["delta"], [], [], []
    for record in records:
        events.append(SgmEvent(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"], steps=1))
        eps = _epsilon(tuple(events), delta, "prv")
        reported = record.get("epsilon")
        if reported is not None and not math.isclose(reported, eps, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
            disagreements.append(f"user-level round {record['round']}: reported eps {reported:.4f}, "
                                 f"recomputed {eps:.4f}")
        out.append({**record, "epsilon_reported": reported, "epsilon": eps})
    last = records[-1]
    return UserLevelAccount(clip_norm=last["clip_norm"], noise_multiplier=last["noise_multiplier"],
                            sample_rate=last["sample_rate"], delta=delta, rounds=out, epsilon=out[-1]["epsilon"],
                            disagreements=disagreements)
