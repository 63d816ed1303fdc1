"""A ledger's file on disk: read whole or refused in one line that names it, and replaced atomically.

The mechanism a reviewer must trust imports nothing of the project's (tests/test_house.py):
what it reads and writes, and how it fails, is all here. A ledger is read whole or not at
all (a corrupt file is refused, never half-read), and written to a temporary file in its
own directory, fsynced and renamed over the old one, the directory fsynced after: a kill at
any moment leaves the old ledger or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class LedgerError(Exception):
    """A ledger that cannot be read or used, in one line naming its file.

    Where users get one-line errors (the fedslm CLI, the ServerApp's report) it is caught
    next to fedslm.common.errors.UserError; at a deployed site it is an internal error, whose detail
    stays in the site's log (client.outbound).
    """


def read(path: Path):
    """The JSON value of a ledger file, or LedgerError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise LedgerError(f"ledger {path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LedgerError(f"ledger {path}: corrupt JSON ({err})") from None


def write(path: Path, data) -> None:
    """Replace ``path`` with ``data`` as JSON: whole or not at all."""
    replace_atomically(Path(path), json.dumps(data, indent=1))


def replace_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory (fedslm.common.jsonfiles writes through it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
