"""The ServerApp: reads the run config, prepares (or resumes) the run directory, runs the rounds."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedslm.common.config import from_run_config
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.ledger_file import LedgerError
from privacy.report.build import write_report
from privacy.report.text import starting_adapter
from server import checkpoint
from server.console import closing_line, say
from server.initial_adapter import load_initial
from server.rounds import Federation, initial_state
from server.rundir import RunDir
from server.status import check_complete, quiet_partial_runs
from slm.base import resolve_model_dir
from slm.lora import LoraSpec, adapter_state, attach
from slm.quiet import quiet_libraries

quiet_libraries()  # also in the ServerApp process Flower starts (flwr run): its console is the user's
quiet_partial_runs()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    specs = RunConfig.parse(from_run_config(context.run_config))  # parsed once; below, typed specs only
    asked = Path(specs.run.id)
    rundir = RunDir.create(specs.run.root, specs.run.id, fresh=not specs.run.resume)
    if specs.run.id and rundir.path.name != asked.name:  # the asked directory holds an earlier run
        say(f"{rundir.path.with_name(asked.name)} already holds a run: this run writes {rundir.path} "
            "(run.resume=true continues that one)")
        specs = specs.changed("run", id=str(asked.with_name(rundir.path.name)))  # what config.json records
    if specs.run.resume:
        state = checkpoint.load(rundir.path)
        rundir.keep_metrics_through(state.round)
    else:
        rundir.write_config(specs.flat())  # resolved values (the aggregation used, the learning rate), not "auto" or 0
        # The initial adapter: every party derives the same one from the shared seed (lora.seed), and the run
        # starts from it, or from server.initial-adapter (checked against it: same tensors, under FFA the same A).
        model, _ = attach(specs.model.name, LoraSpec.of(specs.lora), specs.model.dtype)
        adapter, start = adapter_state(model), None
        if specs.server.initial_adapter:
            adapter, start = load_initial(specs.server.initial_adapter, adapter, specs)
            rundir.write_initial_adapter(start)
            say(f"starting adapter: {starting_adapter(start)}")
        state = initial_state(adapter, specs.server.seed)
    federation = Federation(grid, specs, rundir, state, str(resolve_model_dir(specs.model.name)))
    outcome = federation.run(resumed=specs.run.resume)
    say(f"run directory: {rundir.path}")
    try:
        say(f"privacy report: {write_report(rundir.path)}")
    except (UserError, LedgerError) as err:  # e.g. a run that stopped before round 0 wrote no metrics.jsonl
        say(f"privacy report not written: {err}")
    say(closing_line(outcome, specs.server.rounds))  # last: what actually happened
    check_complete(outcome["rounds_trained"], specs.server.rounds)  # else Flower records finished:failed
