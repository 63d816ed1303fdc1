"""The ServerApp: reads the run config, prepares the run directory, runs the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.rounds import run_federation, say
from server.rundir import RunDir
from slm.base import resolve_model_dir
from slm.config import from_run_config
from slm.lora import LoraSpec, adapter_state, attach

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_run_config(context.run_config)
    rundir = RunDir.create(config["run.root"], config["run.id"])
    rundir.write_config(config)
    # The initial adapter: every party derives the same one from the shared seed (lora.seed).
    model, _ = attach(config["model.name"], LoraSpec.from_config(config), config["model.dtype"])
    outcome = run_federation(grid, config, rundir, adapter_state(model), str(resolve_model_dir(config["model.name"])))
    stopped = f" (stopped early: {outcome['stopped']})" if "stopped" in outcome else ""
    say(f"done: {outcome['rounds_completed']} of {config['server.rounds']} rounds completed{stopped}")
    say(f"run directory: {rundir.path}")
