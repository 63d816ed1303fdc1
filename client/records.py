"""A data file's records, read whole, with one-line errors that name the file (and line).

JSON Lines are read here, with the standard library: a phone reads its own JSONL file,
and importing ``datasets`` to do it costs ~146 MiB of pyarrow and pandas in a process
that has ~1 GB in all (BENCHMARKS.md, phone memory). CSV/TSV and Parquet go through
``datasets``, whose type inference sites already rely on. Either way the caller gets the
same interface: ``len``, rows as dicts, a column as a list, ``column_names``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from slm.errors import UserError
from slm.jsonfiles import iter_json_lines

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
        raise UserError("config key 'data.path': no data file given")
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
    if not file.read_bytes().strip():
        raise UserError(f"data file {path}: holds no records")
    table = _read_json_lines(file) if builder == "json" else _read_with_datasets(file, builder)
    if len(table) == 0:
        raise UserError(f"data file {path}: holds no records")
    return table


def _read_json_lines(file: Path) -> Records:
    rows = list(iter_json_lines(file, "data file"))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Records([{key: row.get(key) for key in columns} for row in rows], columns)


def _read_with_datasets(file: Path, builder: str):
    import datasets

    kwargs = {"delimiter": "\t"} if file.suffix.lower() == ".tsv" else {}
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several types
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data file {file}: cannot be read: {first_line}") from err


def as_dataset(table):
    """A ``datasets.Dataset`` for Flower's partitioners (simulations only: a site never partitions)."""
    if not isinstance(table, Records):
        return table
    import datasets

    return datasets.Dataset.from_list(table.rows)
