"""`fedslm flwr-run`: Flower's own `flwr run .` simulation, without its two surprises.

A plain `flwr run .` starts Flower's managed local SuperLink (flwr/cli/local_superlink.py):

- it installs the app's dependencies before running it (uv), unless the environment says
  ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: for this app that meant a CUDA torch,
  15 nvidia wheels and triton, 5.7 GB, over the CPU torch already installed;
- it starts that SuperLink DETACHED on fixed ports (127.0.0.1:39091/39093, state in
  ``$FLWR_HOME/local-superlink``) and leaves it running after the command returns; a later
  `flwr run` reuses whatever listens there, with whatever settings it was started with.

This command runs the same `flwr run . --stream` with dependency installation off, in a
private ``FLWR_HOME`` with free ports of its own (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
``FLWR_LOCAL_CONTROL_API_PORT``), so it never joins a SuperLink someone else started, and it
stops the SuperLink it started, with every process under it, when the run ends (or fails, or
is interrupted). The app, its config and the run directory are the same as with `flwr run`.
Ray inside Flower's SuperLink runs with Flower's settings, not `fedslm simulate`'s loopback-only
ones (README, "Network exposure of a simulation"): for a simulation, `fedslm simulate` remains
the way we recommend.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fedslm.common.errors import UserError

APP_DIR = Path(__file__).resolve().parents[2]  # the project (its pyproject.toml): fedslm/cli/flwr_run.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_environment(home: Path) -> dict:
    """Flower's processes find its commands (flower-superlink, flower-superexec) next to this Python."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def started_under(home: Path) -> list:
    """The processes of the SuperLink started with this FLWR_HOME, with every descendant."""
    import psutil

    marker = str(home)
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def stop(processes: list, grace: float = 10.0) -> None:
    import psutil

    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


DONE = re.compile(r"\[fedslm\] done: (\d+) of (\d+) rounds trained")
PARTIAL_EXIT = 3  # as `fedslm simulate`: fewer rounds trained than planned (zero included)


def _relay(command: list[str], env: dict) -> int:
    """Run ``command``, copying its output line by line (without a terminal, without its colour codes); the
    exit code the run deserves.

    `flwr run` exits 0 whatever its ServerApp did (measured with flwr 1.41: a ServerApp that raises is
    reported as "Exit Code: 700" in the stream, and the command still returns 0). So the exit code is
    read from the ServerApp's own last line, "[fedslm] done: T of P rounds trained": 0 when T = P,
    3 when fewer rounds trained, 1 when the run never said how it ended (it crashed).
    """
    plain, done = not sys.stdout.isatty(), None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(ANSI.sub("", line) if plain else line)
            sys.stdout.flush()
            done = DONE.search(ANSI.sub("", line)) or done
        code = proc.wait()
    if code != 0:
        return code
    if done is None:
        print("[fedslm] flwr-run: the run ended without its done: line (see the errors above); exit code 1",
              flush=True)
        return 1
    trained, planned = int(done.group(1)), int(done.group(2))
    return 0 if trained >= planned else PARTIAL_EXIT


def run(supernodes: int, run_config: str, app_dir: Path = APP_DIR, keep_home: bool = False) -> int:
    """`flwr run APP --stream` on a private, managed SuperLink that is stopped afterwards; the run's exit code
    (0 all planned rounds trained, 3 fewer, 1 no end reported: see ``_relay``)."""
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    if not Path(flwr).exists():
        raise UserError("flwr-run: the `flwr` command is not installed next to this Python (./install.sh)")
    if supernodes < 1:
        raise UserError("flwr-run: --supernodes must be at least 1")
    if not re.search(r"(^|\s)data\.path\s*=", run_config):  # the app's records are named, never implied
        from simulation.scenarios import DEMO_DATA

        run_config = f"{run_config} data.path='{DEMO_DATA}'".strip()
    home = Path(tempfile.mkdtemp(prefix="fedslm-flwr-home-"))
    command = [flwr, "run", str(app_dir), "--stream", "--federation-config", f"num-supernodes={supernodes}"]
    command += ["--run-config", run_config] if run_config else []
    print(f"[fedslm] flwr-run: {' '.join(command[1:])} (FLWR_HOME {home}, dependency installation off)", flush=True)
    try:
        return _relay(command, flwr_environment(home))
    finally:
        left = started_under(home)
        stop(left)
        print(f"[fedslm] flwr-run: stopped the SuperLink it started ({len(left)} processes)", flush=True)
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
