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
import shutil
import tempfile
from pathlib import Path

from slm.config import SCHEMA

SERVER_APP = "server.app:app"
CLIENT_APP = "client.app:app"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_app_dir(directory: Path, config: dict, client_app: str = CLIENT_APP) -> None:
    lines = ["[project]", 'name = "fedslm-run"', 'version = "0.0.0"', "",
             "[tool.flwr.app]", 'publisher = "fedslm"', "",
             "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{client_app}"', "",
             "[tool.flwr.app.config]"]
    lines += [f'"{key}" = {_toml_value(config[key])}' for key in SCHEMA]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")


def run_in_simulation(config: dict, num_clients: int, cpus_per_client: int | None = None,
                      client_app: str = CLIENT_APP) -> None:
    """Run the ServerApp and ``num_clients`` simulated ClientApps with this config.

    By default one Ray worker gets all cores: on a small CPU machine a single client
    training with every thread is faster and lighter than several workers sharing them,
    and each worker holds its own copy of the base model.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    cpus = cpus_per_client or os.cpu_count() or 1
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
            backend_config={
                "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
            },
            server_app_context=context,
            app_dir=str(app_dir),
            is_app=True,
        )
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
