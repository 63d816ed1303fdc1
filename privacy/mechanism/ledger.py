"""A site's privacy ledger: an append-only history of its DP-SGD releases, on its own disk.

One ledger per site: ``<ledger-dir>/ledger.json``, whatever the records are, however they
are split, whatever run or coordinator asks. Why not one per dataset: the split depends on
settings a coordinator could change (a seed, a test fraction, a cap) and the file on
records a site appends, and a ledger keyed by the records' fingerprint handed each such
change a fresh budget over mostly the same people. Here every release over ANY subset of
the site's records is composed into one total (the safe side: a record outside a subset
is counted as if it had been in it).

The records' fingerprint is still kept, as the data version the ledger last saw. When the
site's training records change, training stops until the operator confirms the new
version (``fedslm confirm-data``); the spend continues, it never resets.

A ledger protects ONE privacy unit for its whole life (client.units: the record, or a
person named by the site's unit field), stated on every entry. Releases under two units
do not compose into one number: a record-level release protects a person with g records
only by group privacy, a unit-level one protects a record only as a change of its unit.
So a site whose unit changes stops training, and ``confirm-data`` accepts the new unit
only for a ledger that has spent nothing under the old one; otherwise the new guarantee
needs a new ledger directory, and the old ledger keeps stating what it spent, in its unit.

A spend is *reserved* (written to disk) before training starts and *committed* after it: a
crash mid-training leaves a reserved entry, which counts. Refused rounds are recorded too
and spend nothing. The budget check happens inside the reservation, against what is on
disk at that moment: past + this round <= budget, whatever round numbers a coordinator
sends.

Every read-modify-write holds an exclusive lock (``fcntl.flock`` on ``ledger.lock``), so
two runs, or two processes, on one ledger never lose each other's spend; every write goes
to a temporary file, is fsynced and renamed over the old one, so a kill at any moment
leaves either the old or the new ledger, never a torn one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privacy.mechanism import ledger_file
from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.ledger_file import LedgerError

FORMAT = "fedslm-ledger/2"
LEGACY_FORMAT = "fedslm-ledger/1"  # one file per dataset fingerprint: ledger-<fp16>.json
LEDGER_FILE = "ledger.json"
LOCK_FILE = "ledger.lock"
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
    data_fingerprint: str = ""  # the data version trained on (ledger format 2)
    mechanism: str = "dp-sgd"  # dp-sgd: a training round; dp-evaluation: noised held-out metrics (sample rate 1)
    adapter_sha256: str = ""  # the adapter the coordinator sent for this release (audit trail)
    unit: str = "record"  # whom the release protects: record | unit:<field> (client.units.PrivacyUnit.ledger_label)
    records_per_unit: int = 1  # unit-level: most records of one unit in one step (k)
    group_records: int = 0  # record-level with the site's group-field: the most records of one person then

    def event(self) -> SgmEvent:
        return SgmEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


@dataclass(frozen=True)
class DataVersion:
    """A version of the site's training records the ledger has accepted."""

    fingerprint: str
    records: int
    time: str
    how: str  # "first use" | "confirmed by the operator" | "imported from ledger-<fp>.json"
    unit: str = "record"  # the privacy unit the ledger protects from this version on; ``records`` counts units


@dataclass
class Ledger:
    """The site's ledger; ``fingerprint``/``records``/``unit`` describe the records this process holds
    (``records`` counts privacy units: records, or units of a unit field)."""

    directory: Path
    fingerprint: str
    records: int
    delta: float
    unit: str = "record"
    entries: list[Entry] = field(default_factory=list)
    data: list[DataVersion] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / LEDGER_FILE

    # ---- reading -------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, *, fingerprint: str, records: int, delta: float,
             unit: str = "record") -> "Ledger":
        """The site's ledger in ``directory``; new (nothing on disk yet) if it has none.

        ``delta`` applies only to a new ledger: it is fixed when the ledger is created,
        because composing events at different deltas over a site's life would make the
        total meaningless. Ledgers of format 1 (one per dataset) found in ``directory``
        are imported: all their entries count.
        """
        ledger = cls(directory=Path(directory), fingerprint=fingerprint, records=records, delta=delta, unit=unit)
        ledger._reload()
        return ledger

    @classmethod
    def load(cls, path: Path) -> "Ledger":
        """A ledger file as it is on disk (for reports and statements)."""
        path = Path(path)
        raw = ledger_file.read(path)
        if isinstance(raw, dict) and raw.get("format") == LEGACY_FORMAT:
            entries, data, delta = _parse_legacy(path, raw)
            return cls(directory=path.parent, fingerprint=data.fingerprint, records=data.records, delta=delta,
                       entries=entries, data=[data])
        ledger = cls(directory=path.parent, fingerprint="", records=0, delta=0.0)
        ledger._read(path, raw)
        if ledger.data:
            last = ledger.data[-1]
            ledger.fingerprint, ledger.records, ledger.unit = last.fingerprint, last.records, last.unit
        return ledger

    def _reload(self) -> None:
        if self.path.exists():
            self._read(self.path, ledger_file.read(self.path))
            return
        legacy = sorted(self.directory.glob("ledger-*.json"))
        self.entries, self.data = [], []
        for old in legacy:
            entries, data, delta = _parse_legacy(old, ledger_file.read(old))
            self.entries += entries
            self.data.append(replace(data, how=f"imported from {old.name}"))
            self.delta = min(self.delta, delta)

    def _read(self, path: Path, raw) -> None:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise LedgerError(f"ledger {path}: not a {FORMAT} file")
        try:
            self.delta = raw["delta"]
            self.entries = [Entry(**e) for e in raw["entries"]]
            self.data = [DataVersion(**d) for d in raw["data"]]
        except (KeyError, TypeError) as err:
            raise LedgerError(f"ledger {path}: missing or unknown field {err}") from None

    @property
    def data_changed(self) -> bool:
        """True when this process's records, or its privacy unit, are not what the ledger last accepted."""
        return bool(self.data) and (self.data[-1].fingerprint != self.fingerprint or self.unit_changed)

    @property
    def unit_changed(self) -> bool:
        return bool(self.data) and self.data[-1].unit != self.unit

    def spent_under_other_units(self) -> list[str]:
        """Units other than this process's that entries have spent under (a ledger never mixes them)."""
        return sorted({e.unit for e in self.entries if e.status in SPENDING and e.unit != self.unit})

    def spent_events(self) -> list[SgmEvent]:
        return [e.event() for e in self.entries if e.status in SPENDING]

    def spent(self, accountant: str = "prv") -> float:
        """Epsilon of everything reserved or committed so far, recomputed from the events."""
        return epsilon(self.spent_events(), delta=self.delta, accountant=accountant)

    # ---- writing (each under the lock, on what is on disk now) --------------------------
    @contextmanager
    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._reload()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def reserve(self, entry: Entry, *, budget: float) -> Entry:
        """Record a spend on disk before training, or a refusal if it would exceed ``budget``.

        The check is past + this round <= budget, on the entries on disk under the lock:
        neither a concurrent run nor a coordinator's round numbers can make it pass wrongly.
        Returns the entry with its epsilons; its status says which (reserved | refused).
        """
        with self._locked():
            if self.data_changed:
                return self._refuse(entry, self.data_change_reason())
            events = [*self.spent_events(), entry.event()]
            eps = epsilon(events, delta=self.delta, accountant="prv", budget=budget)
            if eps > budget:
                return self._refuse(entry, f"budget exhausted: this round would bring the spend to {eps:.3f}, "
                                           f"over the budget {budget:g}")
            if not self.data:
                self.data.append(DataVersion(self.fingerprint, self.records, _now(), "first use", self.unit))
            entry = replace(entry, status="reserved", time=_now(), delta=self.delta, epsilon_after=eps,
                            epsilon_rdp_after=epsilon(events, delta=self.delta, accountant="rdp"),
                            data_fingerprint=self.fingerprint)
            self.entries.append(entry)
            self.save()
            return entry

    def commit(self, entry: Entry) -> Entry:
        """Mark the last reservation of (run, round) as completed."""
        with self._locked():
            for i in range(len(self.entries) - 1, -1, -1):
                e = self.entries[i]
                if (e.run_id, e.round, e.status) == (entry.run_id, entry.round, "reserved"):
                    self.entries[i] = replace(e, status="committed", time=_now())
                    self.save()
                    return self.entries[i]
        raise ValueError(f"no reservation for run {entry.run_id} round {entry.round}")

    def refuse(self, entry: Entry, reason: str) -> Entry:
        with self._locked():
            return self._refuse(entry, reason)

    def _refuse(self, entry: Entry, reason: str) -> Entry:
        entry = replace(entry, status="refused", reason=reason, time=_now(), delta=self.delta, steps=0,
                        epsilon_after=self.spent(), epsilon_rdp_after=self.spent("rdp"))
        self.entries.append(entry)
        self.save()
        return entry

    def confirm_data(self) -> DataVersion:
        """The operator accepts this process's records (and unit) as the site's data; the spend continues.

        A new unit is accepted only while nothing was spent under another one: the ledger
        would otherwise compose releases that protect different people differently.
        """
        with self._locked():
            other = self.spent_under_other_units()
            if other:
                raise LedgerError(f"ledger {self.path}: has spent under privacy unit {other[0]!r}; a ledger never "
                                f"composes releases of two units, so protecting {self.unit!r} is a new guarantee: "
                                "give the site a new ledger-dir for it (the old ledger keeps stating its spend)")
            version = DataVersion(self.fingerprint, self.records, _now(), "confirmed by the operator", self.unit)
            if not self.data or self.data[-1].fingerprint != self.fingerprint or self.unit_changed:
                self.data.append(version)
                self.save()
            return self.data[-1]

    def data_change_reason(self) -> str:
        last = self.data[-1]
        if last.unit != self.unit:
            return (f"the site's privacy unit changed from {last.unit!r} to {self.unit!r} since the ledger last "
                    f"accepted its records; a ledger composes releases of one unit only, so nothing trains until "
                    f"the operator confirms (fedslm confirm-data; refused once spent under the old unit: then a "
                    f"new ledger-dir); the spend so far ({self.spent():.3f}) stays")
        return (f"the site's training records changed since the ledger last accepted them ({last.records} -> "
                f"{self.records} records); nothing trains until the operator confirms the new version "
                f"(fedslm confirm-data); the spend so far ({self.spent():.3f}) stays")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "delta": self.delta,
            "data": [asdict(d) for d in self.data],
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self) -> None:
        ledger_file.write(self.path, self.to_dict())


def _parse_legacy(path: Path, raw) -> tuple[list[Entry], DataVersion, float]:
    try:
        entries = [Entry(**e) for e in raw["entries"]]
        data = DataVersion(raw["dataset"]["fingerprint"], raw["dataset"]["records"], "", "ledger format 1")
        return entries, data, raw["delta"]
    except (KeyError, TypeError) as err:
        raise LedgerError(f"ledger {path}: missing or unknown field {err}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
