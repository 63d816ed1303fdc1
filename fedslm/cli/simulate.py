"""``fedslm simulate``: a federation on this machine, from a scenario or a run directory to resume.

It resolves the run config (the scenario's, the user's --set, the run directory's name),
refuses a used run directory in milliseconds, runs the preflight (simulation.preflight: a bad
file is one line and exit 2 before torch is imported), records how the simulation was
launched (simulation.json, for --resume), runs the engine (simulation.engine) and ends with
the run's `done:` line, read from the files the run wrote, and its exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedslm.common.errors import UserError
from slm.quiet import quiet_libraries

SIMULATION_FILE = "simulation.json"  # how a simulation was launched, for --resume
# Exit codes of `fedslm simulate`: 0 every planned round trained, 2 bad input (UserError), 3 the run ran but
# trained fewer rounds than planned (none included: every site refused or failed, or it stopped early).
PARTIAL_EXIT = 3


def cmd_simulate(args) -> int:
    from fedslm.common.config import RUN_ID, RUN_ID_MAX, parse_assignment, resolve
    from fedslm.common.vocabulary import RunConfig
    from simulation.scenarios import describe, get_scenario

    if args.resume:
        quiet_libraries()
        return _resume(args)
    scenario = get_scenario(args.scenario)
    overrides = dict(parse_assignment(item) for item in args.set)
    if args.model:
        overrides["model.name"] = args.model
    if args.rounds is not None:
        overrides["server.rounds"] = args.rounds
    clients = args.clients if args.clients is not None else scenario.clients
    if args.out:
        out = Path(args.out).expanduser().resolve()
        if not RUN_ID.fullmatch(out.name):
            raise UserError(f"--out {args.out}: the directory's name is the run id, which sites write to their ledger: "
                            f"use 1-{RUN_ID_MAX} letters, digits or . _ : + -")
        overrides.update({"run.root": str(out.parent), "run.id": out.name})
    overrides.setdefault("run.scenario", scenario.name)
    specs = RunConfig.parse(resolve(overrides, base=scenario.overrides))
    specs = specs.changed("run", id=specs.run.id or f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          root=str(Path(specs.run.root).expanduser().resolve()))
    config = specs.flat()  # the flat form Flower's run config takes
    run_dir = Path(specs.run.root) / specs.run.id
    refuse_used(run_dir, "--out" if args.out else "run directory")  # in milliseconds: nothing heavy imported yet
    quiet_libraries()
    from simulation.preflight import preflight

    *lines, window = preflight(config, clients)  # resolves a label task's verbalizers into config
    banner = describe(scenario, RunConfig.parse(config), clients, overrides)
    print(f"[fedslm] scenario {scenario.name}: {banner}", flush=True)
    lines = lines if len(lines) <= 12 else [*lines[:5], f"... and {len(lines) - 5} more clients"]
    for line in [*lines, window]:
        print(f"[fedslm]   {line}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # "x": a simulation started on the same directory meanwhile is refused, not joined
        with (run_dir / SIMULATION_FILE).open("x") as handle:
            handle.write(json.dumps({"clients": clients, "client_app": args.client_app}))
    except FileExistsError:
        refuse_used(run_dir, "--out" if args.out else "run directory")
    return _simulate(config, clients, args, run_dir)


def refuse_used(run_dir: Path, flag: str) -> None:
    """A run directory is written by one run: refuse one that holds anything (an empty one is fine)."""
    from server.rundir import RUN_FILES, run_files

    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    found = run_files(run_dir, (*RUN_FILES, SIMULATION_FILE))
    if found:
        raise UserError(f"{flag} {run_dir} already holds a run ({', '.join(found)}): choose a new --out, or "
                        f"continue a run that stopped with `fedslm simulate --resume {run_dir}`")
    what = "is a file" if run_dir.is_file() else "is not empty and holds no fedslm run"
    raise UserError(f"{flag} {run_dir} {what}: choose a new --out (a new or empty directory)")


def _simulate(config: dict, clients: int, args, run_dir: Path) -> int:
    from fedslm.common.vocabulary import RunConfig
    from simulation.engine import run_in_simulation

    started = time.time()
    run_in_simulation(config, clients, cpus_per_client=args.cpus_per_client, client_app=args.client_app,
                      gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"the simulation ended without writing {run_dir / 'metrics.jsonl'} (see the log above)")
    print(f"[fedslm] finished in {time.time() - started:.0f}s; run directory: {run_dir}", flush=True)
    planned = RunConfig.parse(config).server.rounds
    done, trained = _done_line(run_dir, planned)
    if trained < planned:
        print(f"[fedslm] {done}; exit code {PARTIAL_EXIT}", flush=True)
        return PARTIAL_EXIT
    print(f"[fedslm] {done}", flush=True)
    return 0


def _done_line(run_dir: Path, planned: int) -> tuple[str, int]:
    """The run's `done:` line from its files (the run itself ran in another process), and the rounds trained."""
    from fedslm.common.jsonfiles import iter_json_lines
    from privacy.report.run_files import aggregated_update
    from server.console import closing_line

    rows = list(iter_json_lines(run_dir / "metrics.jsonl"))
    events = list(iter_json_lines(run_dir / "events.jsonl")) if (run_dir / "events.jsonl").is_file() else []
    outcome = {"rounds_trained": len({r["round"] for r in rows if aggregated_update(r)}),
               "rounds_completed": max((r["round"] for r in rows), default=0)}
    if events and events[-1].get("event") == "stopped":
        outcome["stopped"] = events[-1].get("stopped", "no reason recorded")
    return closing_line(outcome, planned), outcome["rounds_trained"]


def _resume(args) -> int:
    """Continue a run directory from its checkpoint, with the configuration it was started with."""
    from fedslm.common.config import resolve
    from fedslm.common.vocabulary import RunConfig

    run_dir = Path(args.resume).expanduser().resolve()
    try:
        config = resolve(json.loads((run_dir / "config.json").read_text()))
        setup = json.loads((run_dir / SIMULATION_FILE).read_text())
    except FileNotFoundError as err:
        raise UserError(f"--resume {run_dir}: {Path(err.filename).name} is missing "
                        "(not a fedslm run directory)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--resume {run_dir}: corrupt JSON ({err})") from None
    if args.set or args.rounds or args.clients or args.model or args.out:
        raise UserError("--resume takes no other run options: a resumed run keeps its configuration")
    specs = RunConfig.parse(config).changed("run", root=str(run_dir.parent), id=run_dir.name, resume=True)
    if not specs.site_data.path:  # a run started before the scenarios named their packaged file stored ""
        from simulation.scenarios import DEMO_DATA

        specs = specs.changed("site_data", path=str(DEMO_DATA))
    config = specs.flat()
    args.client_app = setup.get("client_app") or args.client_app
    print(f"[fedslm] resuming {run_dir}", flush=True)
    return _simulate(config, setup["clients"], args, run_dir)
