"""Run a federation in Flower's Simulation Engine (Ray backend) inside this process.

``flwr.simulation.run_simulation`` hands the apps an EMPTY run config (Flower 1.41), and
``flwr run .`` spawns a detached SuperLink that outlives the command. So we call the
engine the way Flower's own ``flwr-simulation`` process does: the apps are loaded by
reference (``server.app:app``, ``client.app:app``) from an app directory whose
pyproject.toml carries the full resolved run config, which Flower fuses into every
node's Context exactly as in a deployment. The app directory is written next to the run
directory and removed afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import toml_table

SERVER_APP = "server.app:app"
CLIENT_APP = "client.app:app"


def write_app_dir(directory: Path, config: dict, client_app: str = CLIENT_APP) -> None:
    lines = ["[project]", 'name = "fedslm-run"', 'version = "0.0.0"', "",
             "[tool.flwr.app]", 'publisher = "fedslm"', "",
             "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{client_app}"', "",
             "[tool.flwr.app.config]"]
    lines += toml_table(config)
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")


def run_in_simulation(config: dict, num_clients: int, cpus_per_client: int | None = None,
                      client_app: str = CLIENT_APP, gpus_per_client: float = 0.0,
                      ray_address: str | None = None) -> None:
    """Run the ServerApp and ``num_clients`` simulated ClientApps with this config.

    By default one Ray worker gets all cores: on a small CPU machine a single client
    training with every thread is faster and lighter than several workers sharing them,
    and each worker holds its own copy of the base model.

    Without ``ray_address`` a private Ray instance is started that listens on 127.0.0.1
    only (see ``_local_ray``); with it, this process joins that existing cluster.
    """
    if gpus_per_client < 0:
        raise UserError(f"--gpus-per-client {gpus_per_client}: must be 0 or more")
    cpus = _cpus_per_client(cpus_per_client, remote=bool(ray_address))
    init_args = _cluster_ray(ray_address) if ray_address else _local_ray(gpus_per_client, config)
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from server.status import PartialRun

    if not ray_address:
        _check_loopback_only()
    app_dir = Path(tempfile.mkdtemp(prefix="fedslm-app-"))
    try:
        write_app_dir(app_dir, config, client_app)
        # The server's Context must carry the config itself (Flower builds an empty one otherwise).
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            server_app_attr=SERVER_APP,
            client_app_attr=client_app,
            backend_name="ray",
            # Flower's RayBackend passes init_args to ray.init unchanged (flwr 1.41,
            # server/superlink/fleet/vce/backend/raybackend.py).
            backend_config={
                "client_resources": {"num_cpus": cpus, "num_gpus": float(gpus_per_client)},
                "init_args": init_args,
            },
            server_app_context=context,
            app_dir=str(app_dir),
            is_app=True,
        )
    except PartialRun:
        pass  # the ServerApp's way to give Flower's runtimes a failed status; `fedslm simulate` exits 3 from the files
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


def _local_ray(gpus_per_client: float, config: dict) -> dict:
    """ray.init arguments for a private single-machine Ray that is reachable from this machine only.

    An unauthenticated Ray cluster runs any code submitted to it (ShadowRay, CVE-2023-48022),
    and Ray 2.55 on Linux binds GCS, raylet, object manager and workers to all interfaces
    and its agents to the node IP. Every one of them binds loopback when the node IP is
    127.0.0.1, but ray.init replaces a loopback ``_node_ip_address`` by the machine's
    outward IP (``services.resolve_ip_for_localhost``) unless Ray clusters are disabled, as
    they are by default on macOS and Windows: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes
    the node IP the loopback one (``services.get_node_ip_address``). It is read when Ray is
    first imported, so it is set before flwr imports Ray; the child processes inherit it.
    ``address="local"`` starts a new instance even when RAY_ADDRESS is set or ``ray start``
    left a cluster on this machine: joining one is only ever the explicit ``--ray-address``.
    tests/integration/test_loopback.py checks every listening socket of a real run.
    """
    gpus = _gpus(gpus_per_client, config)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
            "num_cpus": os.cpu_count() or 1, "num_gpus": gpus}


def _check_loopback_only() -> None:
    """Refuse to start Ray on all interfaces when Ray was imported before ``_local_ray`` could act."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: its local "
                           "instance would listen on every interface. Import simulation.engine first.")


def _cluster_ray(address: str) -> dict:
    """ray.init arguments that join an existing Ray cluster; its security is its operator's.

    This process then serves Ray on the machine's outward IP too (the cluster's nodes call
    back into the driver), and the clients' code, model and data paths must exist on every
    node of the cluster.
    """
    if not re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+|auto", address):
        raise UserError(f"--ray-address {address!r}: expected HOST:PORT (a Ray head's GCS), ray://HOST:PORT or auto")
    return {"address": address}


def _gpus(gpus_per_client: float, config: dict) -> int:
    """This machine's CUDA GPUs for Ray, after checking that ``gpus_per_client`` can be placed.

    Ray places a client only where its whole reservation fits, so an impossible one would
    wait forever; a reservation above 1 must be whole (Ray's rule for num_gpus). A client
    that reserves no GPU sees none (Ray empties CUDA_VISIBLE_DEVICES for it).
    """
    import torch

    if gpus_per_client > 1 and gpus_per_client != int(gpus_per_client):
        raise UserError(f"--gpus-per-client {gpus_per_client}: above 1 it must be a whole number of GPUs")
    available = torch.cuda.device_count()
    if gpus_per_client > 0 and available == 0:
        raise UserError(f"--gpus-per-client {gpus_per_client}: this machine has no CUDA GPU")
    if gpus_per_client > available:
        raise UserError(f"--gpus-per-client {gpus_per_client}: this machine has {available} GPU(s)")
    if gpus_per_client == 0 and str(config.get("model.device", "")).startswith("cuda"):
        raise UserError("model.device=cuda needs --gpus-per-client above 0: a client that reserves no GPU sees none")
    return available


def _cpus_per_client(cpus_per_client: int | None, remote: bool) -> int:
    cores = os.cpu_count() or 1
    if cpus_per_client is None:
        return cores
    if cpus_per_client < 1 or (not remote and cpus_per_client > cores):
        raise UserError(f"--cpus-per-client {cpus_per_client}: must be 1 to {cores} (this machine's cores)")
    return cpus_per_client
