"""The client's privacy ledger: an append-only history of its DP-SGD spend, on its own disk.

One ledger per dataset, keyed by a fingerprint of the records (content hash + count), so
restarting the process or node, or starting a new run on the same data, continues the
same spend, while a different dataset gets its own budget. A spend is *reserved* (written
to disk) before training starts and *committed* after it: a crash mid-training leaves a
reserved entry, which counts. Refused rounds are recorded too and spend nothing.

Every write goes to a temporary file, is fsynced and renamed over the old file, so a
kill at any moment leaves either the old or the new ledger, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privacy.mechanism.accountant import SgmEvent, epsilon
from slm.errors import UserError
from slm.jsonfiles import read_json, write_json_atomic

FORMAT = "fedslm-ledger/1"
SPENDING = ("reserved", "committed")


def fingerprint(records: list[dict]) -> str:
    """sha256 over the records in canonical JSON (sorted keys), in order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One round's spend (or refusal). Fields never change meaning; add new ones instead."""

    run_id: str
    round: int
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    epsilon_rdp_after: float
    max_epsilon: float
    status: str  # reserved | committed | refused
    sampling: str = "poisson"
    accountant: str = "prv"
    time: str = ""
    reason: str = ""

    def event(self) -> SgmEvent:
        return SgmEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


@dataclass
class Ledger:
    path: Path
    fingerprint: str
    records: int
    delta: float
    entries: list[Entry] = field(default_factory=list)

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, *, fingerprint: str, records: int, delta: float) -> "Ledger":
        """The ledger of this dataset in ``directory``, created empty if it has none yet.

        ``delta`` is fixed when the ledger is created: composing events at different
        deltas over a dataset's lifetime would make the total meaningless.
        """
        path = Path(directory) / f"ledger-{fingerprint[:16]}.json"
        if path.exists():
            ledger = cls.load(path)
            if ledger.fingerprint != fingerprint:
                raise UserError(f"ledger {path}: belongs to another dataset (fingerprint mismatch)")
            return ledger
        return cls(path=path, fingerprint=fingerprint, records=records, delta=delta)

    @classmethod
    def load(cls, path: Path) -> "Ledger":
        path = Path(path)
        raw = read_json(path, "ledger")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"ledger {path}: not a {FORMAT} file")
        try:
            entries = [Entry(**e) for e in raw["entries"]]
            return cls(path=path, fingerprint=raw["dataset"]["fingerprint"], records=raw["dataset"]["records"],
                       delta=raw["delta"], entries=entries)
        except (KeyError, TypeError) as err:
            raise UserError(f"ledger {path}: missing or unknown field {err}") from None

    def spent_events(self) -> list[SgmEvent]:
        return [e.event() for e in self.entries if e.status in SPENDING]

    def spent(self, accountant: str = "prv") -> float:
        """Epsilon of everything reserved or committed so far, recomputed from the events."""
        return epsilon(self.spent_events(), delta=self.delta, accountant=accountant)

    # ---- writing -------------------------------------------------------------------
    def reserve(self, entry: Entry) -> Entry:
        """Record a spend on disk before training; returns the entry with its epsilons."""
        events = [*self.spent_events(), entry.event()]
        entry = replace(
            entry, status="reserved", time=_now(), delta=self.delta,
            epsilon_after=epsilon(events, delta=self.delta, accountant="prv"),
            epsilon_rdp_after=epsilon(events, delta=self.delta, accountant="rdp"),
        )
        self.entries.append(entry)
        self.save()
        return entry

    def commit(self, entry: Entry) -> Entry:
        """Mark the last reservation of (run, round) as completed."""
        for i in range(len(self.entries) - 1, -1, -1):
            e = self.entries[i]
            if (e.run_id, e.round, e.status) == (entry.run_id, entry.round, "reserved"):
                self.entries[i] = replace(e, status="committed", time=_now())
                self.save()
                return self.entries[i]
        raise ValueError(f"no reservation for run {entry.run_id} round {entry.round}")

    def refuse(self, entry: Entry, reason: str) -> Entry:
        spent = self.spent()
        entry = replace(entry, status="refused", reason=reason, time=_now(), delta=self.delta, steps=0,
                        epsilon_after=spent, epsilon_rdp_after=self.spent("rdp"))
        self.entries.append(entry)
        self.save()
        return entry

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "dataset": {"fingerprint": self.fingerprint, "records": self.records},
            "delta": self.delta,
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self) -> None:
        write_json_atomic(self.path, self.to_dict())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
