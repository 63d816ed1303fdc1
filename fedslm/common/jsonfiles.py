"""Reading JSON and JSON Lines files with one-line errors that name the file (and line); atomic writes.

Shared by everything that reads user- or run-produced JSON: data files, ledgers, run
directories. A corrupt file is reported, never half-read. Text is UTF-8, with or without
a byte-order mark; anything else is refused at its line and byte, never replaced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from fedslm.common.errors import UserError
from privacy.mechanism.ledger_file import replace_atomically

UTF8_BOM = b"\xef\xbb\xbf"


def read_json(path: Path, label: str = ""):
    where = f"{label} {path}".strip()
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: corrupt JSON ({err})") from None


def utf8_lines(path: Path, label: str = "") -> Iterator[tuple[int, str]]:
    """Each line of a UTF-8 file with its number (from 1), a leading byte-order mark dropped.

    Read as bytes, one line at a time (a phone's memory), so that the first byte that is
    not UTF-8 stops the read with its line and its offset in the file.
    """
    where = f"{label} {path}".strip()
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            skip = len(UTF8_BOM) if number == 1 and raw.startswith(UTF8_BOM) else 0
            try:
                line = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as err:
                bad = offset + skip + err.start
                raise UserError(f"{where}: line {number} is not UTF-8 (byte 0x{raw[skip + err.start]:02x} at byte "
                                f"offset {bad}); re-save it as UTF-8") from None
            offset += len(raw)
            yield number, line


def iter_json_lines(path: Path, label: str = "") -> Iterator[dict]:
    """Each non-blank line as a JSON object; the first bad line stops with its number."""
    where = f"{label} {path}".strip()
    for number, line in utf8_lines(path, label):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: line {number} is not a JSON object")
        yield record


def finite(value):
    """JSON has no inf/nan: each non-finite float becomes None (null), in dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def strict_line(record) -> str:
    """One JSON Lines line (no newline) that any strict JSON reader accepts: non-finite floats as null."""
    return json.dumps(finite(record), allow_nan=False)


def write_json_atomic(path: Path, data, strict: bool = False) -> None:
    """Written whole or not at all (privacy.mechanism.ledger_file.replace_atomically: temp file, fsync, rename).

    ``strict``: non-finite floats are written as null (see ``finite``), never as bare NaN/Infinity.
    """
    if strict:
        data = finite(data)
    replace_atomically(Path(path), json.dumps(data, indent=1, allow_nan=not strict))
