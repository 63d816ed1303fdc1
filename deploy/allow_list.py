"""A site's app allow-list: the sha256 of every Flower app bundle (FAB) the site agreed to run.

One approved bundle per line, ``<sha256>  <comment>`` (the comment says which app, version and
date; ``python -m deploy.approve`` writes the lines); blank lines and lines starting with ``#``
are ignored. The file belongs to the site, on the site's disk: the coordinator never sees it.

A malformed line is an error, never skipped: a list that cannot be read is a list that
approves nothing, and the operator should hear about it by file and line. The guard that
enforces the list (deploy/app_guard.py) runs before any app code, so this module imports
nothing of the app's packages (slm, client, ...), only the standard library: an import here
would shadow the bundle's own modules in that process.

``python -m deploy.allow_list FILE`` checks a file and says how many apps it approves
(deploy/supernode.sh runs it before the SuperNode starts).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")


class AllowListError(Exception):
    """An allow-list that cannot be read, in one line naming the file (and line)."""


def parse(text: str, where: str) -> dict[str, str]:
    """{sha256: comment} of every approved bundle in ``text``; ``where`` names it in errors."""
    approved: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, comment = line.partition(" ")
        if not SHA256.fullmatch(digest):
            raise AllowListError(f"allow-list {where}: line {number} does not start with a sha256 "
                                 f"(64 lowercase hex digits): {line[:80]!r}")
        approved.setdefault(digest, comment.strip())
    return approved


def read(path: Path) -> dict[str, str]:
    """{sha256: comment} of the bundles approved in the file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise AllowListError(f"allow-list {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise AllowListError(f"allow-list {path}: not a UTF-8 text file") from None
    return parse(text, str(path))


def entry(digest: str, comment: str) -> str:
    """One line of the file (with its newline)."""
    if not SHA256.fullmatch(digest):
        raise AllowListError(f"not a sha256: {digest!r}")
    return f"{digest}  {' '.join(comment.split())}\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m deploy.allow_list", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", metavar="FILE", help="the site's allow-list (one '<sha256>  <comment>' per line)")
    args = [parser.parse_args(argv).file]
    try:
        approved = read(Path(args[0]))
    except AllowListError as err:
        print(f"deploy.allow_list: error: {err}", file=sys.stderr)
        return 2
    if approved:
        print(f"allow-list {args[0]}: {len(approved)} approved app bundle(s)")
    else:
        print(f"allow-list {args[0]}: empty; every run is refused until an app is approved "
              "(python -m deploy.approve APP_DIR --allow-list FILE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
