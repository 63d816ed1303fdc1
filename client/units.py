"""The privacy unit: whom a site's guarantee protects — a record, or a person with many records.

A hospital protects a patient, not a note: with record-level (eps, delta) a patient with
g records is protected only by group privacy, roughly g eps and a far worse delta. A site
that names a ``privacy-unit-field`` (e.g. ``patient_id``) trains with unit-level DP-SGD
(client.unit_sgd): Poisson sampling over its units, at most ``max-records-per-unit``
records of each sampled unit per step, the unit's mean gradient clipped as one. Its
neighbouring relation is then add/remove one unit with all of its records (user-level DP
with user-level sampling: Charles et al., "Fine-Tuning Large Language Models with
User-Level Differential Privacy", SaTML 2025; Chua et al., "Mind the Privacy Unit!
User-Level Differential Privacy for Language Model Fine-Tuning", COLM 2024).

The unit field is the site's own setting (node config), never a coordinator's, and it
never leaves the site: no task may name it, and replies carry only the unit's word
("patient") and counts the report states.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedslm.common.errors import UserError

RECORD = "record"


@dataclass(frozen=True)
class PrivacyUnit:
    """What one site protects. ``field`` '' = each record is its own unit (record-level DP)."""

    field: str = ""
    max_records: int = 1  # k: most records of one unit in one step (unit-level only)
    name: str = "person"  # the word reports use for a unit ("patient", "user")

    @property
    def record_level(self) -> bool:
        return not self.field

    @property
    def ledger_label(self) -> str:
        """What the site's ledger calls this unit: a ledger never composes releases of two units."""
        return RECORD if self.record_level else f"unit:{self.field}"

    @property
    def word(self) -> str:
        return RECORD if self.record_level else self.name

    def record_fields(self) -> dict:
        """What a reply says of the unit: its word and k, never the field (it names a column of the site's file)."""
        return {"unit": self.word, "records_per_unit": 1 if self.record_level else self.max_records}

    def check(self, where: str) -> None:
        if not self.record_level and self.max_records < 1:
            raise UserError(f"{where}: 'max-records-per-unit' must be at least 1, got {self.max_records}")
        if not self.record_level and not self.name.strip():
            raise UserError(f"{where}: 'privacy-unit-name' must name the unit (e.g. patient)")


def unit_key(record: dict, field: str, where: str = ""):
    """The unit a record belongs to; a record without one is refused (it would be nobody's, unprotected)."""
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: a record has no value in the privacy unit field '{field}' (every record must "
                        "name its unit, else it is protected as no one's)")
    return value


def group_by_unit(records: list[dict], field: str, where: str = "") -> list[list[int]]:
    """Indices of each unit's records, units in order of first appearance, records in file order.

    With one record per unit this is [[0], [1], ...]: unit-level DP-SGD is then record-level
    DP-SGD, step for step (tests/client/test_unit_sgd.py).
    """
    if not field:
        return [[i] for i in range(len(records))]
    units: dict = {}
    for i, record in enumerate(records):
        units.setdefault(_hashable(unit_key(record, field, where)), []).append(i)
    return list(units.values())


def training_units(unit: PrivacyUnit, records: list[dict]) -> list[list[int]] | None:
    """The training records' units for unit-level DP-SGD (None: record-level, each record its own)."""
    return None if unit.record_level else group_by_unit(records, unit.field, "the site's training records")


def largest_unit(records: list[dict], field: str, where: str = "") -> int:
    """The most records any one unit holds (the group size a record-level guarantee must cover for it)."""
    return max((len(u) for u in group_by_unit(records, field, where)), default=0)


def _hashable(value):
    return value if isinstance(value, (str, int, float, bool)) else repr(value)


def sample_rate(batch_size: int, records: int, where: str = "client", what: str = "records") -> float:
    """Poisson sampling's q: the expected batch over the units (records, or people) a step samples from."""
    if batch_size < 1:
        raise UserError("config key 'train.batch-size': must be at least 1")
    if batch_size > records:
        raise UserError(
            f"config key 'train.batch-size': {batch_size} is larger than {where}'s {records} training {what}"
        )
    return batch_size / records
