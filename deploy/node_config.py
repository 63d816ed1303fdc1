"""Check a site's node config before its SuperNode starts (deploy/supernode.sh runs this first).

The ClientApp lets these node-config keys win over the run config the server sends, and
silently ignores any other key. In a deployment three of them must be set, or the site's
privacy rests on the server:

- ``ledger-dir``: without it the ledger goes under a path derived from the server's run
  directory, so the next run would open a fresh ledger, a reset budget;
- ``max-epsilon``: without it the budget is whatever the server's run config says;
- ``data-path``: without it the ClientApp trains on the packaged example file.

A misspelt key (``max_epsilon``) would silently drop a local setting, so it is an error
here, as is a relative path (the ClientApp processes resolve it against the SuperNode's
working directory, which a service manager may change).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from client.app import NODE_KEYS, SITE_NAME_KEY, site_name  # the ClientApp's own mapping (imports torch: a few seconds per node start)
from slm.config import resolve
from slm.errors import UserError

WHY = {"data-path": "the site's own records", "ledger-dir": "where the site's privacy ledger persists across runs",
       "max-epsilon": "the site's own budget; without it the server's run config decides"}


def check(path: Path) -> dict:
    """The parsed node config, or a UserError naming the file and the key."""
    try:
        config = tomllib.loads(path.read_text())
    except OSError as err:
        raise UserError(f"node config {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"node config {path}: not valid TOML ({err})") from None
    known = [*NODE_KEYS, SITE_NAME_KEY]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise UserError(f"node config {path}: unknown key '{unknown[0]}' (known: {', '.join(known)})")
    if SITE_NAME_KEY in config:
        try:
            site_name(config[SITE_NAME_KEY])
        except UserError as err:
            raise UserError(f"node config {path}: {err}") from None
    for key, why in WHY.items():
        if key not in config:
            raise UserError(f"node config {path}: '{key}' is required in a deployment ({why})")
    try:  # the types the ClientApp will accept
        resolved = resolve({NODE_KEYS[key]: value for key, value in config.items() if key in NODE_KEYS})
    except UserError as err:
        raise UserError(f"node config {path}: {err}") from None
    for key in ("data-path", "ledger-dir"):
        if not Path(config[key]).is_absolute():
            raise UserError(f"node config {path}: {key} must be an absolute path, got {config[key]!r}")
    if not Path(config["data-path"]).is_file():
        raise UserError(f"node config {path}: data-path {config['data-path']} is not a file")
    if resolved[NODE_KEYS["max-epsilon"]] <= 0:
        raise UserError(f"node config {path}: max-epsilon must be positive, got {config['max-epsilon']!r}")
    if not 0 <= resolved[NODE_KEYS["delta"]] < 1:
        raise UserError(f"node config {path}: delta must be in [0, 1), got {config['delta']!r}")
    return config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m deploy.node_config NODE_CONFIG.toml", file=sys.stderr)
        return 2
    try:
        config = check(Path(args[0]))
    except UserError as err:
        print(f"deploy.node_config: error: {err}", file=sys.stderr)
        return 2
    print(f"node config {args[0]}: " + ", ".join(f"{key} {value}" for key, value in config.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
