"""A data file's records, read whole, with one-line errors that name the file (and line).

JSON Lines are read here, with the standard library: a phone reads its own JSONL file,
and importing ``datasets`` to do it costs ~146 MiB of pyarrow and pandas in a process
that has ~1 GB in all (BENCHMARKS.md, phone memory). CSV/TSV and Parquet go through
``datasets``, whose type inference sites already rely on (a CSV's numeric labels stay
numbers, and a site's record-hash split hashes them as such). Either way the caller gets
the same interface: ``len``, rows as dicts, a column as a list, ``column_names``.

One contract for every text file (JSONL, CSV, TSV): UTF-8, with or without a byte-order
mark (never part of the first column's name); any other byte is refused at its line and
offset, never replaced. CSV/TSV bytes are checked here before ``datasets`` sees them. An
empty file, or a CSV with only its header, is refused with what is missing.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import iter_json_lines, utf8_lines

SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class Records(Sequence):
    """Rows as dicts, every row holding every column (None where a line lacks it, as datasets fills).

    Hashed by identity, like a ``datasets.Dataset``: the per-table caches in client.data key on it.
    """

    def __init__(self, rows: list[dict], column_names: list[str]):
        self.rows = rows
        self.column_names = column_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        return self.rows[key]

    def __iter__(self):
        return iter(self.rows)

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def read_table(path: str):
    """Read a whole file (``Records`` or a ``datasets.Dataset``), once per process and file version."""
    file = Path(path)
    if not path:
        raise UserError("config key 'data.path': no data file given (a deployed site names its file in its node "
                        "config's data-path; `fedslm simulate` takes the scenario's, or --set data.path=FILE)")
    if not file.is_file():
        raise UserError(f"data file {path}: not found")
    stat = file.stat()
    return _read_file(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _read_file(path: str, mtime_ns: int, size: int):
    """Keyed by version: a worker serving a thousand phone clients reads the file once."""
    file = Path(path)
    builder = SUFFIX_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise UserError(f"data file {path}: unsupported type {file.suffix!r} (use .jsonl, .csv, .tsv or .parquet)")
    if builder == "json":
        table = _read_json_lines(file)
    else:
        if builder == "csv":
            _check_csv(file)
        table = _read_with_datasets(file, builder)
    if len(table) == 0:
        raise _no_records(file, builder)
    return table


def _no_records(file: Path, builder: str) -> UserError:
    needed = {"json": "one JSON object per line", "csv": "a header line with the column names, then one record "
              "per line", "parquet": "at least one row"}[builder]
    return UserError(f"data file {file}: holds no records; it needs {needed}")


def _read_json_lines(file: Path) -> Records:
    rows = list(iter_json_lines(file, "data file"))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Records([{key: row.get(key) for key in columns} for row in rows], columns)


def _delimiter(file: Path) -> str:
    return "\t" if file.suffix.lower() == ".tsv" else ","


def _check_csv(file: Path) -> None:
    """Every byte UTF-8 (line and offset of the first that is not), and a record below the header.

    ``datasets`` would report the first as a parser error three lines deep, and the second
    as 'Instruction "train" corresponds to no data!'.
    """
    lines = (line for _, line in utf8_lines(file, "data file"))
    filled = (row for row in csv.reader(lines, delimiter=_delimiter(file)) if any(field.strip() for field in row))
    try:
        header, record = next(filled, None), next(filled, None)
    except csv.Error:  # a field past the csv module's size limit: there are records, datasets parses them
        header = record = []
    if header is None:
        raise _no_records(file, "csv")
    if record is None:
        raise UserError(f"data file {file}: holds no records, only its header line ({', '.join(header)}); "
                        "add one record per line below it")
    for _ in lines:  # the rest of the file, for its bytes
        pass


def _read_with_datasets(file: Path, builder: str):
    import datasets

    if file.stat().st_size == 0:  # parquet: a CSV was found empty before
        raise _no_records(file, builder)
    kwargs = {"delimiter": _delimiter(file), "encoding": "utf-8-sig"} if builder == "csv" else {}
    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its "Failed to read file" log line: the error below says it in one
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several types: the innermost says what is wrong
        while err.__cause__ is not None or err.__context__ is not None:
            err = err.__cause__ or err.__context__
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data file {file}: cannot be read as {file.suffix.lower()[1:].upper()}: "
                        f"{first_line}") from None
    finally:
        quiet.setLevel(level)


def as_dataset(table):
    """A ``datasets.Dataset`` for Flower's partitioners (simulations only: a site never partitions)."""
    if not isinstance(table, Records):
        return table
    import datasets

    return datasets.Dataset.from_list(table.rows)
