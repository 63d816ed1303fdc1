"""Reading JSON and JSON Lines files with one-line errors that name the file (and line); atomic writes.

Shared by everything that reads user- or run-produced JSON: data files, ledgers, run
directories. A corrupt file is reported, never half-read.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slm.errors import UserError


def read_json(path: Path, label: str = ""):
    where = f"{label} {path}".strip()
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: corrupt JSON ({err})") from None


def iter_json_lines(path: Path, label: str = "") -> Iterator[dict]:
    """Each non-blank line as a JSON object; the first bad line stops with its number."""
    where = f"{label} {path}".strip()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: line {number} is not a JSON object")
            yield record


def write_json_atomic(path: Path, data) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
