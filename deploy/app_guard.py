"""The site's app guard: Flower's own ``flwr-clientapp``, refusing every app bundle the site has not approved.

Why: a SuperNode runs whatever app the coordinator submits with ``flwr run``, and a bundle
with DP switched off voids every guarantee the site's ledger records. Flower's own check
(``flower-supernode --trusted-entities``) needs Flower Hub signatures, which neither a bundle
from ``flwr run .`` nor an air-gapped hospital has. So the site pins the exact bundles it
audited by their sha256: ``python -m deploy.approve`` writes them to the site's allow-list
(deploy/allow_list.py), named by ``$FEDSLM_APPROVED_APPS``.

How: deploy/supernode.sh puts deploy/site-bin/ first on PATH, so the SuperNode's SuperExec
starts ``python -m deploy.app_guard`` (same arguments) where it would start ``flwr-clientapp``.
That runs Flower's own ``flwr-clientapp`` with two names of its runtime module replaced:

- ``install_from_fab``: hashes the bundle bytes the SuperNode handed over and looks the hash up
  in the allow-list (read for every message: approving or revoking needs no restart); only an
  approved bundle goes on to Flower, which unpacks it into a directory named by the full hash,
  ``$FLWR_HOME/approved/<sha256>/`` (nothing unpacked before, by an unguarded SuperNode or for
  another bundle with the same 8-digit prefix, is reused);
- ``get_load_client_app_fn``: loads the ClientApp from exactly that directory, not from the one
  the run's metadata would point to (fab id, version and hash are the coordinator's word).

A bundle not on the list is refused before anything in it is unpacked or imported: the
coordinator's reply is an error naming the hash prefix, the site's log (stderr) gets one line
with the full hash. flwr is pinned (1.41.0); should an upgrade stop calling what is replaced
here, the guard exits with an error instead of running unguarded.

This process imports nothing of the app's packages (slm, client, ...): imported here they
would shadow the bundle's own modules when Flower loads it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from deploy.allow_list import AllowListError, read

ENV = "FEDSLM_APPROVED_APPS"
REPLACED = ("install_from_fab", "get_load_client_app_fn")  # names in flwr.supernode.runtime.run_clientapp


class NotApproved(Exception):
    """The bundle is not on this site's allow-list; the message is what the coordinator reads."""


def say(line: str) -> None:
    print(f"fedslm app guard: {line}", file=sys.stderr, flush=True)


class Guard:
    """One flwr-clientapp process: its bundle checked, then unpacked and loaded from where it was unpacked."""

    def __init__(self, install_from_fab, get_load_client_app_fn, allow_list: str | None, flwr_home: Path):
        self.flower_install, self.flower_loader = install_from_fab, get_load_client_app_fn
        self.allow_list, self.flwr_home = allow_list, flwr_home
        self.installed: Path | None = None

    def check(self, fab: bytes) -> str:
        """The bundle's sha256 if this site approved it, else NotApproved (and one line in the site's log)."""
        digest = hashlib.sha256(fab).hexdigest()
        refused = NotApproved(f"app {digest[:16]} is not approved by this site")
        try:
            if not self.allow_list:
                raise AllowListError(f"{ENV} is not set")
            approved = read(Path(self.allow_list))
        except AllowListError as err:
            say(f"REFUSED app sha256 {digest}: no usable allow-list ({err}); nothing of it was unpacked or run")
            raise refused from None
        if digest not in approved:
            say(f"REFUSED app sha256 {digest}: not in this site's allow-list {self.allow_list}; "
                "nothing of it was unpacked or run")
            raise refused
        say(f"app sha256 {digest} approved ({approved[digest] or 'no comment'})")
        return digest

    def install(self, fab_file, install_dir=None, skip_prompt=False) -> Path:
        """Stands in for flwr.cli.install.install_from_fab: check first, then Flower unpacks."""
        if not isinstance(fab_file, bytes):  # the runtime always passes the bytes it received
            raise NotApproved("app bundle not received as bytes")
        digest = self.check(fab_file)
        self.installed = self.flower_install(fab_file, install_dir=self.flwr_home / "approved" / digest,
                                             skip_prompt=True)
        return self.installed

    def loader(self, default_app_ref: str, app_path: str | None, multi_app: bool):
        """Stands in for get_load_client_app_fn: Flower's loader, pinned to the approved directory."""
        if self.installed is None:
            raise NotApproved("no approved app bundle was unpacked")
        return self.flower_loader(default_app_ref=default_app_ref, app_path=str(self.installed), multi_app=multi_app)


def guard_flower(allow_list: str | None) -> Guard:
    """Replace the two names in Flower's ClientApp runtime; stop if Flower no longer calls them."""
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    called = runtime.run_clientapp.__code__.co_names
    missing = [name for name in REPLACED if not hasattr(runtime, name) or name not in called]
    if missing:
        raise SystemExit(f"fedslm app guard: error: flwr.supernode.runtime.run_clientapp no longer calls "
                         f"{', '.join(missing)} (Flower upgraded past 1.41?); refusing to run any app unguarded")
    guard = Guard(runtime.install_from_fab, runtime.get_load_client_app_fn, allow_list, get_flwr_home())
    runtime.install_from_fab, runtime.get_load_client_app_fn = guard.install, guard.loader
    return guard


def main() -> None:
    guard_flower(os.environ.get(ENV))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()  # parses the same arguments as the flwr-clientapp command


if __name__ == "__main__":
    # Run from the module imported by its name: the coordinator's error reply then names
    # deploy.app_guard.NotApproved, not __main__.NotApproved.
    from deploy.app_guard import main as guarded_main

    guarded_main()
