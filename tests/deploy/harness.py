"""A loopback federation built from the deploy kit: credentials, a SuperLink, SuperNodes, `flwr`.

Every server is started through deploy/superlink.sh and deploy/supernode.sh, so the tests run
exactly what an operator runs; each one lives in its own process group and is stopped by PID
(servers.running), also when a test fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

from servers import BIN, free_port, running, tool_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONNECTION = "fed"


def certs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "deploy.certs", *args], cwd=ROOT, check=True, capture_output=True,
                   timeout=60)


def cli_home(path: Path, port: int, ca: Path) -> Path:
    """An FLWR_HOME whose config.toml names the SuperLink connection, verified against our CA."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    return path


def flwr(home: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=tool_env(home), capture_output=True, text=True,
                          timeout=timeout)


def script_env(flwr_home: Path, **settings: str) -> dict:
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {**tool_env(flwr_home), "FEDSLM_VENV": str(BIN.parent), **settings}


def app_snapshot(dest: Path) -> Path:
    """The repository's app as Flower bundles it (the files `flwr run ROOT` would send), unpacked into ``dest``.

    Runs submit this snapshot, not the live checkout: the hash a site approves must stay the
    hash of what is submitted even while someone edits the working tree.
    """
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        fab.extractall(dest)
    shutil.rmtree(dest / ".info")  # Flower's manifest of the bundle, rebuilt by every `flwr run`
    return dest


def approve(app: Path, allow_list: Path) -> str:
    """What a site runs after auditing ``app``: `python -m deploy.approve APP --allow-list FILE`; the hash."""
    proc = subprocess.run([sys.executable, "-m", "deploy.approve", str(app), "--allow-list", str(allow_list)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def write_node_config(path: Path, **values) -> Path:
    """The site's node config as TOML (keys like data-path); JSON string quoting is valid TOML."""
    path.write_text("".join(f"{key.replace('_', '-')} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


@contextmanager
def superlink(workdir: Path, port: int, creds: Path):
    env = script_env(workdir / "superlink-home", FEDSLM_CREDENTIALS=str(creds), FEDSLM_PORT=str(port),
                     FEDSLM_DATABASE=str(workdir / "superlink.db"))
    with running([str(DEPLOY / "superlink.sh")], env, workdir / "superlink.log", port) as proc:
        yield proc


def flwr_home(workdir: Path, name: str) -> Path:
    """A SuperNode's FLWR_HOME: where its approved bundles are unpacked."""
    return workdir / name / "flwr-home"


def allow_list(workdir: Path, name: str) -> Path:
    """A site's app allow-list (FEDSLM_APPROVED_APPS), on the site's side of the tree."""
    return workdir / name / "approved-apps.txt"


def supernode_env(workdir: Path, name: str, superlink_port: int, ca: Path, key: Path, node_config: Path,
                  runtime_port: int) -> dict:
    return script_env(flwr_home(workdir, name), FEDSLM_SUPERLINK=f"127.0.0.1:{superlink_port}",
                      FEDSLM_CA=str(ca), FEDSLM_KEY=str(key), FEDSLM_NODE_CONFIG=str(node_config),
                      FEDSLM_RUNTIME_PORT=str(runtime_port), FEDSLM_APPROVED_APPS=str(allow_list(workdir, name)))


@contextmanager
def supernode(workdir: Path, name: str, superlink_port: int, ca: Path, key: Path, node_config: Path, log: Path):
    """A SuperNode; ready once its Runtime API (where its ClientApp processes connect) listens."""
    runtime_port = free_port()
    env = supernode_env(workdir, name, superlink_port, ca, key, node_config, runtime_port)
    with running([str(DEPLOY / "supernode.sh")], env, log, runtime_port) as proc:
        yield proc


def run_until_exit(args: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run a process that is expected to stop by itself; kill its group by PID if it does not."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its flower-superexec child, or all of it on timeout
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def non_loopback_listeners(process_groups: set[int]) -> list[str]:
    """Listening TCP sockets of these process groups that are bound to anything but 127.0.0.1."""
    if shutil.which("ss") is None:
        return []
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    found = []
    for line in lines:
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            try:
                group = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if group in process_groups and not fields[3].startswith("127.0.0.1:"):
                found.append(line)
    return found
