"""A simulation is reachable from this machine only: every socket its processes listen on is loopback.

An unauthenticated Ray cluster reachable from the network runs any code submitted to it
(ShadowRay, CVE-2023-48022). This runs a real tiny simulation and, while it runs, lists the
listening TCP sockets and bound UDP sockets of every process of the run: the fedslm process
and its descendants, and, in case Ray daemons are reparented, every process that carries this
run's marker in its environment, this run's Ray temp dir on its command line, or a file open
under it (Ray's agents rename themselves, which blanks their command line and environment).
"""

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

pytestmark = pytest.mark.integration

MARKER = "FEDSLM_LOOPBACK_TEST_RUN"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def _run_processes(root: psutil.Process, mark: str, ray_tmp: str) -> list[psutil.Process]:
    ray_tmp = os.path.join(ray_tmp, "")
    found = {}
    try:
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        try:
            if (ray_tmp in " ".join(proc.cmdline()) or proc.environ().get(MARKER) == mark
                    or any(f.path.startswith(ray_tmp) for f in proc.open_files())):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def _listening(proc: psutil.Process) -> list[tuple[str, str, int]]:
    sockets = []
    for conn in proc.net_connections(kind="inet"):
        if conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN:
            sockets.append(("TCP", conn.laddr.ip, conn.laddr.port))
        elif conn.type == socket.SOCK_DGRAM and not conn.raddr:
            sockets.append(("UDP", conn.laddr.ip, conn.laddr.port))
    return sockets


def test_every_socket_of_a_simulation_listens_on_loopback_only(tmp_path, model_cache):
    mark = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="fedslm-ray-")  # short: Ray's unix socket paths live under it
    env = {**os.environ, MARKER: mark, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "simulate.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedslm", "simulate", "--scenario", "tiny", "--rounds", "1", "--clients", "1",
         "--out", str(tmp_path / "run")],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
    )
    root = psutil.Process(proc.pid)
    seen: dict[tuple, str] = {}
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            for p in _run_processes(root, mark, ray_tmp):
                try:
                    name = p.name()
                    for sock in _listening(p):
                        seen.setdefault(sock, f"{name} (pid {p.pid})")
                except psutil.Error:
                    continue
            time.sleep(0.2)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _run_processes(root, mark, ray_tmp):  # only this run's leftovers, if any
            if p.pid != os.getpid():
                try:
                    p.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log.seek(0)
    assert proc.returncode == 0, log.read()[-3000:]
    owners = " ".join(seen.values())
    # The check cannot pass vacuously: Ray's GCS, raylet, runtime-env agent and workers were caught listening.
    assert all(name in owners for name in ("gcs_server", "raylet", "RuntimeEnvAgent", "ray::")) and len(seen) >= 5, seen
    exposed = {f"{kind} {ip}:{port}": owner for (kind, ip, port), owner in seen.items() if not _is_loopback(ip)}
    assert not exposed, f"listening beyond loopback: {exposed}"
