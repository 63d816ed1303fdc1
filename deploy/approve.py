"""``python -m deploy.approve APP_DIR [--allow-list FILE]``: approve one app version for this site.

Prints the sha256 of the app bundle (FAB) that ``flwr run APP_DIR`` submits and, with
``--allow-list``, adds it to the site's allow-list (deploy/allow_list.py), which
deploy/app_guard.py enforces before any app code runs on the site.

The hash is computed with the function ``flwr run`` itself calls (flwr/cli/build.py
``build_fab_from_disk``): Flower builds the bundle deterministically (sorted paths, fixed zip
dates), the SuperNode hands exactly those bytes to every ClientApp process, and Flower names
the bundle by their sha256 (``Fab.hash_str``). So a site computes, offline and from the source
it audited, the hash the coordinator's submission must have, without taking the
coordinator's word for it. The same files built by the same Flower version (the project pins
1.41.0) give the same hash; any other file, or another Flower version's zip output, gives
another hash, and the site refuses it (fail closed).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from deploy.allow_list import AllowListError, entry, read
from deploy.certs import write  # atomic: temporary file, then rename
from fedslm.common.errors import UserError


def bundle(app: Path) -> bytes:
    """The FAB ``flwr run APP`` would submit, byte for byte."""
    from flwr.cli.build import build_fab_from_disk

    if not app.is_dir():
        raise UserError(f"app directory {app}: not a directory")
    try:
        return build_fab_from_disk(app)
    except (ValueError, OSError) as err:  # no pyproject.toml, invalid [tool.flwr.app], too large, unreadable
        message = " ".join(str(err).split())
        raise UserError(f"app directory {app}: Flower cannot bundle it ({message})") from None


def fab_hash(fab: bytes) -> str:
    """How Flower names a bundle (flwr/cli/run/run.py, flwr/cli/install.py): sha256 of its bytes."""
    return hashlib.sha256(fab).hexdigest()


def describe(fab: bytes, app: Path) -> str:
    """The allow-list comment: which app, which version, from where, when approved."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    return f"{fab_id} {version} from {app.resolve()} approved {time.strftime('%Y-%m-%d %H:%M %Z')}"


def add(allow_list: Path, digest: str, comment: str) -> bool:
    """Append ``digest`` to the allow-list file (created if missing); False if it is already there.

    The file is rewritten whole through a temporary file and a rename, so a ClientApp
    process reading it at the same moment sees the old list or the new one, never half a line.
    """
    if allow_list.exists():
        if digest in read(allow_list):  # also refuses to append to a malformed list
            return False
        old, mode = allow_list.read_text(encoding="utf-8"), allow_list.stat().st_mode & 0o777
    else:
        old, mode = "", 0o644
        allow_list.parent.mkdir(parents=True, exist_ok=True)
    prefix = old if not old or old.endswith("\n") else old + "\n"
    write(allow_list, (prefix + entry(digest, comment)).encode("utf-8"), mode)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.approve", description=__doc__.split("\n\n")[0])
    parser.add_argument("app", type=Path, metavar="APP_DIR", help="the app directory, as audited")
    parser.add_argument("--allow-list", type=Path, metavar="FILE",
                        help="this site's allow-list (FEDSLM_APPROVED_APPS of its SuperNode); created if missing")
    args = parser.parse_args(argv)
    try:
        fab = bundle(args.app)
        digest = fab_hash(fab)
        print(digest)
        if args.allow_list is not None:
            comment = describe(fab, args.app)
            added = add(args.allow_list, digest, comment)
            print(f"allow-list {args.allow_list}: " + (f"added ({comment})" if added else "already approved"),
                  file=sys.stderr)
    except (UserError, AllowListError) as err:
        print(f"deploy.approve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
