"""A client's local records: read from a file, checked against the field mapping, split.

Files are read by client.records (JSONL natively, CSV/TSV and Parquet through ``datasets``).
In a simulation every client reads the same file and keeps its own partition (flwr-datasets partitioners:
iid, dirichlet by a label column, natural by an id column); in a deployment the file is
the client's own and the partition is all of it. Each client then holds out a
deterministic test split for federated evaluation. Nothing here leaves the client.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from client.records import as_dataset, read_table
from client.units import group_by_unit
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from slm.tasks import derive_verbalizers, parse_verbalizers, uncovered


@dataclass(frozen=True)
class DataSpec:
    path: str
    task: str
    prompt_field: str
    response_field: str
    text_field: str
    label_field: str
    verbalizers: str
    partition: str
    partition_by: str
    dirichlet_alpha: float
    test_fraction: float
    max_train: int
    max_eval: int
    seed: int
    split: str = "seeded"  # seeded (simulation: data.seed) | record-hash (a site: stable, set by nobody)
    test_path: str = ""  # a site's pinned held-out records; then every record of ``path`` trains
    eval_path: str = ""  # a simulation's held-out file, partitioned as ``path``; then every record of it trains
    unit_field: str = ""  # whom a record is about (client.units): the held-out split keeps each unit whole

    @classmethod
    def of(cls, specs: RunConfig) -> "DataSpec":
        """The file is named, never implied: a site's is its node config's data-path, a simulation's is its
        scenario's (simulation/examples holds the demo's); an empty ``data.path`` is an error when read."""
        task, site, split = specs.task, specs.site_data, specs.partition
        return cls(path=site.path, task=task.task, prompt_field=task.prompt_field, response_field=task.response_field,
                   text_field=task.text_field, label_field=task.label_field, verbalizers=task.verbalizers,
                   partition=split.partition, partition_by=split.partition_by, dirichlet_alpha=split.dirichlet_alpha,
                   test_fraction=site.test_fraction, max_train=site.max_train_examples,
                   max_eval=site.max_eval_examples, seed=split.seed, eval_path=site.eval_path,
                   unit_field=specs.dp.privacy_unit_field or specs.dp.group_field)

    @classmethod
    def from_config(cls, config: dict) -> "DataSpec":
        """From a resolved flat config, for the rooms that do not pass typed specs yet."""
        return cls.of(RunConfig.parse(config))

    def required_fields(self) -> list[str]:
        if self.task == "sft":
            return [self.prompt_field, self.response_field]
        if self.task == "label":
            return [self.text_field, self.label_field]
        return [self.text_field]


def check_fields(table, spec: DataSpec) -> None:
    """Every field the task reads is a column, and no record leaves it empty (the first one is named)."""
    for field in spec.required_fields():
        key = {spec.prompt_field: "prompt-field", spec.response_field: "response-field",
               spec.text_field: "text-field", spec.label_field: "label-field"}[field]
        if field not in table.column_names:
            raise UserError(f"data file {spec.path}: field '{field}' (data.{key}) is missing; columns are "
                            f"{', '.join(table.column_names)}: {_missing_fix(table.column_names, key)}")
        index = _first_empty(table, field)
        if index is not None:
            raise UserError(f"data file {spec.path}: record {index + 1} has an empty '{field}' (data.{key})")
    if spec.unit_field:
        if spec.unit_field not in table.column_names:
            raise UserError(f"data file {spec.path}: the privacy unit field '{spec.unit_field}' is missing; columns "
                            f"are {', '.join(table.column_names)}")
        index = _first_empty(table, spec.unit_field)
        if index is not None:
            raise UserError(f"data file {spec.path}: record {index + 1} names no unit in '{spec.unit_field}' "
                            "(every record must name whom it is about, else no one's guarantee covers it)")


def _missing_fix(columns: list[str], key: str) -> str:
    """A CSV written with another separator reads as one column holding the whole header line."""
    separator = next((s for s in ";\t,|" if len(columns) == 1 and s in columns[0]), None)
    if separator is not None:
        return (f"the header reads as one column, so the file looks separated by {separator!r}; "
                "save it comma-separated (.csv) or tab-separated (.tsv)")
    return f"set data.{key} to one of them, or rename the column in the file"


@lru_cache(maxsize=8)
def _first_empty(table, field: str) -> int | None:
    """Once per (cached) table: a worker serving a thousand phone clients scans each column once."""
    return next((i for i, v in enumerate(table[field]) if v is None or not str(v).strip()), None)


@lru_cache(maxsize=8)
def _label_values(table, field: str) -> frozenset:
    return frozenset(str(v).strip() for v in table[field])


def resolve_verbalizers(spec: DataSpec, *tables) -> str:
    """A label task's data.verbalizers, checked against every label in ``tables``.

    Empty: the label values themselves when they are words (sorted: every party that derives
    them from the same file scores the same candidates). Given: every label found must have one.
    """
    if spec.task != "label":
        return spec.verbalizers
    values = set().union(*(_label_values(table, spec.label_field) for table in tables))
    if not spec.verbalizers.strip():
        return derive_verbalizers(values, f"data file {spec.path}")
    missing = uncovered(parse_verbalizers(spec.verbalizers), values)
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise UserError(f"config key 'data.verbalizers': labels {shown} in data file {spec.path} have no "
                        "verbalizer (add value=word pairs, or leave the key empty to use word labels as they are)")
    return spec.verbalizers


def partition(table, spec: DataSpec, partition_id: int, num_partitions: int):
    """This client's share of a shared file, using Flower's partitioners."""
    if num_partitions <= 1:
        return table
    if spec.partition in ("dirichlet", "natural") and spec.partition_by not in table.column_names:
        how = "one client per value" if spec.partition == "natural" else "a skewed split by its values"
        raise UserError(f"data file {spec.path}: field '{spec.partition_by}' (data.partition-by, {how}) is missing; "
                        f"columns are {', '.join(table.column_names)}: name one of them with --set "
                        "data.partition-by=COLUMN, or split at random with --set data.partition=iid")
    partitioner = _partitioner(table, spec, num_partitions)
    try:
        part = partitioner.load_partition(partition_id)
    except IndexError:
        raise UserError(f"data file {spec.path}: partition {partition_id} of {num_partitions} is empty "
                        f"({len(table)} records for {num_partitions} clients)") from None
    except (ValueError, KeyError) as err:
        raise UserError(f"data file {spec.path}: cannot make partition {partition_id}: {err}") from None
    if len(part) == 0:
        raise UserError(f"data file {spec.path}: partition {partition_id} of {num_partitions} is empty")
    return part


@lru_cache(maxsize=2)
def _partitioner(table, spec: DataSpec, num_partitions: int):
    """One partitioner per (cached) table: it indexes the whole table once, then serves every client."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    if spec.partition == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif spec.partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by=spec.partition_by,
            alpha=spec.dirichlet_alpha, seed=spec.seed, min_partition_size=0,
        )
    else:
        ids = sorted(set(table[spec.partition_by]), key=str)
        if len(ids) != num_partitions:
            raise UserError(
                f"data file {spec.path}: natural partition by '{spec.partition_by}' has {len(ids)} "
                f"groups but the federation has {num_partitions} clients"
            )
        partitioner = NaturalIdPartitioner(partition_by=spec.partition_by)
    partitioner.dataset = as_dataset(table)
    return partitioner


@dataclass(frozen=True)
class LocalData:
    """What one client holds: its name, its train and test records (lists of dicts), and for a
    label task the verbalizers resolved against its file (client.app puts them into the task)."""

    name: str
    train: list
    test: list
    verbalizers: str = ""


def split(records, spec: DataSpec, name: str) -> LocalData:
    """Hold out ``test_fraction`` of the records for evaluation; train on the rest.

    ``seeded`` (simulations): a shuffle by ``data.seed``. ``record-hash`` (a deployed site):
    a record is held out when the sha256 of its content, read as a fraction of 2^256, is
    below ``test_fraction``. Nobody sets it, so no coordinator can move records between
    the training and held-out sides, and appending records never moves the old ones.
    With a unit field (client.units) both split whole units: the hash is of the unit's
    value, the shuffle is of units, so a patient's records are all trained on or all held out.
    """
    import random

    rows = list(records)
    units = group_by_unit(rows, spec.unit_field, f"data file {spec.path}")  # [[0], [1], ...] without a unit field
    if spec.split == "record-hash":
        def key(unit: list[int]) -> dict:
            return {"unit": rows[unit[0]][spec.unit_field]} if spec.unit_field else rows[unit[0]]

        held = {i for u in units if held_out_by_hash(key(u), spec.test_fraction) for i in u}
        test = [row for i, row in enumerate(rows) if i in held]
        train = [row for i, row in enumerate(rows) if i not in held]
    else:
        order = list(range(len(units)))
        random.Random(spec.seed).shuffle(order)
        n_test = max(1, round(len(units) * spec.test_fraction)) if len(units) > 1 else 0
        test = [rows[i] for u in order[:n_test] for i in units[u]]
        train = [rows[i] for u in order[n_test:] for i in units[u]]
    if not train:
        raise UserError(f"data file {spec.path}: client '{name}' has no training records after the test split")
    if spec.max_train:
        train = train[: spec.max_train]
    if spec.max_eval:
        test = test[: spec.max_eval]
    return LocalData(name=name, train=train, test=test)


def held_out_by_hash(record: dict, fraction: float) -> bool:
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest(), "big") < fraction * 2**256


def load_local_data(spec: DataSpec, partition_id: int, num_partitions: int) -> LocalData:
    """Read, check, partition and split once per process and file version (a worker serves many rounds).

    The files' versions are part of the key: a site whose records change must see the
    change (its ledger refuses to train on unconfirmed records), not a cached old copy.
    """
    return _load_local_data(spec, partition_id, num_partitions, _version(spec.path), _version(spec.test_path),
                            _version(spec.eval_path))


def _version(path: str) -> tuple:
    if not path or not Path(path).is_file():
        return ()
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=4)
def _load_local_data(spec: DataSpec, partition_id: int, num_partitions: int, *_versions) -> LocalData:
    table = read_table(spec.path)
    check_fields(table, spec)
    if spec.test_path:  # a site that pins its held-out records: all of ``path`` trains
        held = read_table(spec.test_path)
        check_fields(held, replace(spec, path=spec.test_path))
        train = list(table)[: spec.max_train or None]
        return LocalData(name="site", train=train, test=list(held)[: spec.max_eval or None],
                         verbalizers=resolve_verbalizers(spec, table, held))
    # A simulated client reads the whole shared file(s): it resolves what the preflight resolved.
    tables = (table, *held_out_table(spec))
    verbalizers = resolve_verbalizers(spec, *tables)
    part = partition(table, spec, partition_id, num_partitions)
    if spec.partition == "natural" and num_partitions > 1:
        name = str(part[0][spec.partition_by])
    else:
        name = f"client-{partition_id}"
    if not spec.eval_path:
        return replace(split(part, spec, name), verbalizers=verbalizers)
    held = partition(tables[1], replace(spec, path=spec.eval_path), partition_id, num_partitions)
    return LocalData(name=name, train=list(part)[: spec.max_train or None],
                     test=list(held)[: spec.max_eval or None], verbalizers=verbalizers)


def held_out_table(spec: DataSpec) -> tuple:
    """A simulation's separate held-out file, read and checked; () when it has none."""
    if not spec.eval_path:
        return ()
    held = read_table(spec.eval_path)
    check_fields(held, replace(spec, path=spec.eval_path))
    return (held,)
