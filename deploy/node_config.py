"""Check a site's node config before its SuperNode starts (deploy/supernode.sh runs this first).

The node config is the site's policy (client.site.SitePolicy): its budget, delta, records,
held-out records, ledger and name. The ClientApp reads it with the same code, so what passes
here is exactly what the ClientApp will enforce. Required: ``name`` (unnamed sites would all
be one client on the coordinator), ``data-path``, ``ledger-dir`` (without it every run would
reset the budget), ``max-epsilon``. A misspelt key (``max_epsilon``) would silently drop a
local setting, so it is an error here, as is a relative path (the ClientApp processes
resolve it against the SuperNode's working directory, which a service manager may change).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from client.site import NODE_KEYS, REQUIRED, SitePolicy  # the ClientApp's own policy (standard library only)
from fedslm.common.errors import UserError


def check(path: Path) -> dict:
    """The parsed node config, or a UserError naming the file and the key."""
    try:
        config = tomllib.loads(path.read_text())
    except OSError as err:
        raise UserError(f"node config {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"node config {path}: not valid TOML ({err})") from None
    unknown = sorted(set(config) - set(NODE_KEYS))
    if unknown:
        raise UserError(f"node config {path}: unknown key '{unknown[0]}' (known: {', '.join(NODE_KEYS)})")
    where = f"node config {path}"
    try:
        policy = SitePolicy.from_node_config(config, where=where)
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None
    for key, value in (("data-path", policy.data_path), ("test-data-path", policy.test_data_path)):
        if value and not Path(value).is_file():
            raise UserError(f"{where}: {key} {value} is not a file")
    return config


def main(argv: list[str] | None = None) -> int:
    keys = "\n".join(f"  {key}{' (required)' if key in REQUIRED else ''}: {meaning}"
                     for key, (_, _, meaning) in NODE_KEYS.items())
    parser = argparse.ArgumentParser(prog="python -m deploy.node_config", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"node config keys (TOML, one per line):\n{keys}")
    parser.add_argument("node_config", metavar="NODE_CONFIG.toml", help="the site's node config to check")
    args = parser.parse_args(argv)
    try:
        config = check(Path(args.node_config))
    except UserError as err:
        print(f"deploy.node_config: error: {err}", file=sys.stderr)
        return 2
    print(f"node config {args.node_config}: " + ", ".join(f"{key} {value}" for key, value in config.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
