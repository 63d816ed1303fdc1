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
  approved bundle goes on to Flower, which unpacks it into a fresh temporary directory that is
  then renamed, whole, to a directory named by the full hash, ``$FLWR_HOME/approved/<sha256>/``
  (nothing unpacked before, by an unguarded SuperNode or for another bundle with the same 8-digit
  prefix, is reused; a crash mid-unpack leaves no such directory). A later message reuses that
  directory only if its files are, byte for byte, the files of the approved bundle bytes it
  arrived with (no file missing, changed, added, or replaced by a link; ``__pycache__`` counts as
  added, and this process writes none); otherwise it logs why, discards the directory and unpacks
  the approved bytes again. What is checked is the bundle in hand, not a manifest on the same disk
  an intruder could rewrite. Not covered: a writer racing the check and the import a moment later.
- ``get_load_client_app_fn``: loads the ClientApp from exactly that directory, not from the one
  the run's metadata would point to (fab id, version and hash are the coordinator's word).

A bundle not on the list is refused before anything in it is unpacked or imported: the
coordinator's reply is an error naming the hash prefix and the site by the ``name`` of its node
config (``$FEDSLM_NODE_CONFIG``; a site refused every app has sent nothing else, and the
coordinator would otherwise know it only as node-<id>); the site's log (stderr) gets one line
with the full hash. flwr is pinned (1.41.0); should an upgrade stop calling what is replaced
here, the guard exits with an error instead of running unguarded.

This process imports nothing of the app's packages (slm, client, ...): imported here they
would shadow the bundle's own modules when Flower loads it.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import stat
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

from deploy.allow_list import AllowListError, read

ENV = "FEDSLM_APPROVED_APPS"
REPLACED = ("install_from_fab", "get_load_client_app_fn")  # names in flwr.supernode.runtime.run_clientapp
APPS = "apps"  # flwr.common.constant.APP_DIR: Flower unpacks to INSTALL_DIR/apps/<publisher>.<name>.<version>.<hash8>/


class NotApproved(Exception):
    """The bundle is not on this site's allow-list; the message is what the coordinator reads."""


def say(line: str) -> None:
    print(f"fedslm app guard: {line}", file=sys.stderr, flush=True)


class Guard:
    """One flwr-clientapp process: its bundle checked, then unpacked and loaded from where it was unpacked."""

    def __init__(self, install_from_fab, get_load_client_app_fn, allow_list: str | None, flwr_home: Path,
                 site: str = ""):
        self.flower_install, self.flower_loader = install_from_fab, get_load_client_app_fn
        self.allow_list, self.flwr_home, self.site = allow_list, flwr_home, site
        self.installed: Path | None = None

    def check(self, fab: bytes) -> str:
        """The bundle's sha256 if this site approved it, else NotApproved (and one line in the site's log)."""
        digest = hashlib.sha256(fab).hexdigest()
        refused = NotApproved(f"app {digest[:16]} is not approved by " + (f"site '{self.site}'" if self.site
                                                                           else "this site"))
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
        self.installed = self.unpack(fab_file, digest)
        return self.installed

    def unpack(self, fab: bytes, digest: str) -> Path:
        """The app directory of ``approved/<digest>/``: reused if it holds exactly the bundle's files, else unpacked."""
        root, files = self.flwr_home / "approved", bundle_tree(fab)
        target = root / digest
        if target.exists() or target.is_symlink():
            app, problem = unpacked_app(target, files)
            if problem is None:
                return app
            say(f"unpacked app {target} does not match the approved bundle ({problem}); "
                "not run, unpacked again from the approved bundle")
            discard(target)
        root.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.unpacking.", dir=root))
        try:
            self.flower_install(fab, install_dir=fresh, skip_prompt=True)
            _, problem = unpacked_app(fresh, files)
            if problem is not None:  # Flower changed how it unpacks: stop rather than guess
                raise NotApproved(f"app {digest[:16]}: Flower's unpack does not match the bundle ({problem})")
            try:
                os.rename(fresh, target)  # atomic: approved/<digest>/ is a complete unpack or absent
            except OSError:
                if not target.is_dir():
                    raise  # not "another process was first"
        finally:
            if fresh.exists():
                shutil.rmtree(fresh, ignore_errors=True)
        app, problem = unpacked_app(target, files)  # ours, or a concurrent process's that won the rename
        if problem is not None:
            raise NotApproved(f"app {digest[:16]}: its unpacked files changed while it was installed ({problem})")
        return app

    def loader(self, default_app_ref: str, app_path: str | None, multi_app: bool):
        """Stands in for get_load_client_app_fn: Flower's loader, pinned to the approved directory."""
        if self.installed is None:
            raise NotApproved("no approved app bundle was unpacked")
        return self.flower_loader(default_app_ref=default_app_ref, app_path=str(self.installed), multi_app=multi_app)


def bundle_tree(fab: bytes) -> dict[str, str | None]:
    """What Flower unpacks from ``fab`` (all but its .info/ manifest): relative path -> sha256, None for a directory."""
    tree: dict[str, str | None] = {}
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        for member in bundle.infolist():
            path = PurePosixPath(member.filename)
            if path.parts[0] == ".info":
                continue
            tree.update({parent.as_posix(): None for parent in path.parents if parent.parts})
            tree[path.as_posix()] = None if member.is_dir() else hashlib.sha256(bundle.read(member)).hexdigest()
    return tree


def disk_tree(app: Path) -> tuple[dict[str, str | None], str | None]:
    """The files under ``app`` like bundle_tree, and the first entry that is neither a plain file nor a directory."""
    tree: dict[str, str | None] = {}
    for folder, dirs, names in os.walk(app):  # never follows a link
        for name in sorted(dirs + names):
            path = Path(folder, name)
            relative, mode = path.relative_to(app).as_posix(), path.lstat().st_mode
            if stat.S_ISLNK(mode):
                return tree, f"{relative} is a symbolic link"
            if stat.S_ISDIR(mode):
                tree[relative] = None
            elif stat.S_ISREG(mode):
                tree[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                return tree, f"{relative} is not a plain file"
    return tree, None


def unpacked_app(target: Path, files: dict[str, str | None]) -> tuple[Path | None, str | None]:
    """The app directory Flower unpacked under ``target``, and why it is not exactly ``files`` (None if it is)."""
    if target.is_symlink() or not target.is_dir():
        return None, "not a directory"
    if os.listdir(target) != [APPS] or (target / APPS).is_symlink() or not (target / APPS).is_dir():
        return None, f"it holds {sorted(os.listdir(target))}, not one {APPS}/ directory"
    apps = os.listdir(target / APPS)
    if len(apps) != 1:
        return None, f"{APPS}/ holds {len(apps)} entries, not one app"
    app = target / APPS / apps[0]
    if app.is_symlink() or not app.is_dir():
        return None, f"{APPS}/{apps[0]} is not a directory"
    found, problem = disk_tree(app)
    if problem is None:
        problem = next((f"{path} is missing" for path in sorted(files.keys() - found.keys())), None)
    if problem is None:
        problem = next((f"{path} is not in the bundle" for path in sorted(found.keys() - files.keys())), None)
    if problem is None:
        problem = next((f"{path} differs from the bundle" for path in sorted(files) if files[path] != found[path]),
                       None)
    return app, problem


def discard(target: Path) -> None:
    """Move ``target`` out of the way in one rename (nobody reuses a half-deleted directory), then delete it."""
    aside = target.with_name(f".{target.name[:16]}.discarded.{secrets.token_hex(8)}")
    os.rename(target, aside)
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside)


def site_name(node_config: str | None) -> str:
    """The ``name`` of the site's node config ('' when unset or unreadable: the refusal then says "this site").

    Read with tomllib alone: this process imports nothing of the app (see above), and the
    node config was checked by deploy/supernode.sh when the SuperNode started.
    """
    try:
        name = tomllib.loads(Path(node_config).read_text(encoding="utf-8")).get("name", "") if node_config else ""
    except (OSError, ValueError):
        return ""
    return name if isinstance(name, str) and name.isprintable() and "'" not in name and len(name) <= 120 else ""


def guard_flower(allow_list: str | None) -> Guard:
    """Replace the two names in Flower's ClientApp runtime; stop if Flower no longer calls them."""
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    called = runtime.run_clientapp.__code__.co_names
    missing = [name for name in REPLACED if not hasattr(runtime, name) or name not in called]
    if missing:
        raise SystemExit(f"fedslm app guard: error: flwr.supernode.runtime.run_clientapp no longer calls "
                         f"{', '.join(missing)} (Flower upgraded past 1.41?); refusing to run any app unguarded")
    guard = Guard(runtime.install_from_fab, runtime.get_load_client_app_fn, allow_list, get_flwr_home(),
                  site_name(os.environ.get("FEDSLM_NODE_CONFIG")))
    sys.dont_write_bytecode = True  # no __pycache__ in the approved directory: the next message would discard it
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
