"""Check a simulated federation's inputs before any worker starts.

A bad file, field or batch size found inside a Ray worker surfaces as a remote traceback
after the engine has spun up; checked here it is one clear line and a non-zero exit.
Also converts the default model once, in this process, before workers race to do it.
"""

from __future__ import annotations

from client.data import DataSpec, load_local_data
from client.site import SitePolicy
from client.train import sample_rate
from server.rounds import RoundSpec
from slm.base import resolve_model_dir
from slm.lora import LoraSpec
from slm.tasks import Task


def preflight(config: dict, num_clients: int) -> list[str]:
    """Validate everything; return one description line per client."""
    if num_clients < 1:
        from slm.errors import UserError

        raise UserError("--clients: must be at least 1")
    LoraSpec.from_config(config)
    RoundSpec.from_config(config)
    Task.from_config(config)
    resolve_model_dir(config["model.name"])
    spec = DataSpec.from_config(config)
    lines = []
    for pid in range(num_clients):
        local = load_local_data(spec, pid, num_clients)
        sample_rate(config["train.batch-size"], len(local.train), where=f"client '{local.name}'")
        SitePolicy.for_simulation(config, local.name, run_dir="")
        lines.append(f"{local.name}: {len(local.train)} train / {len(local.test)} test records")
    return lines
