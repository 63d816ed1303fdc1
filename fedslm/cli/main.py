"""The ``fedslm`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedslm.cli import audit as audit_cmd
from fedslm.cli.simulate import cmd_simulate
from fedslm.common.errors import UserError
from privacy.mechanism.ledger_file import LedgerError
from slm.quiet import quiet_libraries


def cmd_budget(args) -> int:
    from privacy.mechanism.ledger import Ledger
    from privacy.report.statement import find_ledgers, render_table, statement

    docs = [statement(Ledger.load(path)) for path in find_ledgers(args.ledger)]
    if args.html is not None:
        from privacy.report.html import write_budget_html

        target = Path(args.ledger)
        out = Path(args.html) if args.html else (target if target.is_dir() else target.parent) / "budget.html"
        print(f"[fedslm] budget page: {write_budget_html(docs, out)}")
    elif args.json:
        print(json.dumps(docs if len(docs) > 1 else docs[0], indent=1))
    else:
        print("\n\n".join(render_table(doc) for doc in docs))
    return 0


def cmd_flwr_run(args) -> int:
    from fedslm.cli.flwr_run import run

    return run(args.supernodes, args.run_config, keep_home=args.keep_home)


def cmd_confirm_data(args) -> int:
    from client.confirm import confirm_data
    from fedslm.common.config import parse_assignment

    print(f"[fedslm] {confirm_data(Path(args.node_config), dict(parse_assignment(a) for a in args.set))}")
    return 0


def cmd_compare(args) -> int:
    from fedslm.cli.compare import render, summarize

    summaries = [summarize(run) for run in args.runs]
    print(json.dumps(summaries, indent=1) if args.json else render(summaries))
    return 0


def cmd_report(args) -> int:
    from privacy.report.build import write_report

    html = write_report(args.run_dir)
    print(f"[fedslm] privacy report: {html}  (and report.json, plots/ next to it)")
    return 0


def cmd_export(args) -> int:
    from fedslm.common.config import resolve
    from fedslm.common.vocabulary import RunConfig
    from server.ship import build_artifacts, parse_quants

    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        specs = RunConfig.parse(resolve(json.loads((run_dir / "config.json").read_text())))
    except FileNotFoundError:
        raise UserError(f"run directory {run_dir}: config.json is missing") from None
    rounds = sorted(int(p.name.split("-")[1]) for p in (run_dir / "adapters").glob("round-*"))
    server_round = args.round if args.round is not None else (rounds[-1] if rounds else 0)
    build_artifacts(run_dir, specs, server_round, parse_quants(args.quant))
    print(f"[fedslm] wrote {run_dir / 'model'}")
    return 0


def cmd_chat(args) -> int:
    from slm.chat import chat

    chat(args.model, args.prompt, args.max_new_tokens)
    print()
    return 0


def cmd_data(args) -> int:
    from fedslm.cli.data import show_data

    print(show_data(args.file, args.set, clients=args.clients, scenario=args.scenario))
    return 0


def cmd_warm_start(args) -> int:
    from privacy.report.text import starting_adapter
    from simulation.warm_start import warm_start

    record = warm_start(args.file, args.out, args.set, scenario=args.scenario, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr)
    out = Path(args.out).expanduser().resolve()
    start = {"directory": str(out), "adapter_sha256": record["adapter_sha256"], "warm_start": record}
    print(f"[fedslm] warm start: {starting_adapter(start)}")
    print(f"[fedslm] start a run from it: --set server.initial-adapter={out}")
    return 0


def cmd_keys(args) -> int:
    from dataclasses import fields

    from fedslm.common.vocabulary import CONCEPTS, SCHEMA, defaults, flat_name, toml_table

    if args.toml:
        print("\n".join(["[tool.flwr.app.config]", *toml_table(defaults())]))
        return 0
    for concept in CONCEPTS:
        print(f"# {concept.__doc__.strip()}")
        for field in fields(concept):
            name = flat_name(concept, field)
            key = SCHEMA[name]
            choices = f" [{'|'.join(key.choices)}]" if key.choices else ""
            bounds = f" ({key.range})" if key.range else ""
            print(f"{name} = {key.default!r}{choices}{bounds}  decided by the {key.owner}\n    {key.help}")
    return 0


# Who runs each command (`fedslm --help` lists them so; tests/fedslm/test_audiences.py keeps the groups and the commands
# the same). Deploying a site or a SuperLink is deploy/'s: see deploy/README.md.
AUDIENCES = {
    "a site operator": ("budget", "confirm-data", "report", "chat"),
    "a researcher or coordinator": ("simulate", "data", "warm-start", "flwr-run", "compare", "report", "audit",
                                    "export", "keys"),
}


def build_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(f"{who}: {', '.join(commands)}" for who, commands in AUDIENCES.items())
    parser = argparse.ArgumentParser(prog="fedslm", description="Federated DP-LoRA fine-tuning of small LMs",
                                     epilog=epilog + "\na site's deployment: python -m deploy.node_config --help "
                                     "(deploy/README.md)", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("--scenario", default="hospital", help="tiny | hospital | phone (default: hospital)")
    sim.add_argument("--rounds", type=int, help="federated rounds (overrides server.rounds)")
    sim.add_argument("--clients", type=int, help="number of simulated clients")
    sim.add_argument("--out", help="run directory (default: runs/<scenario>-<time>)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sim.add_argument("--model", help="a local HF model directory (or 'smollm2', 'tiny'); same as --set model.name=")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round")
    sim.add_argument("--cpus-per-client", type=int, help="cores per simulated client (default: all)")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, metavar="F",
                     help="GPUs reserved per simulated client; fractions share one (0.25 = four per GPU; default 0)")
    sim.add_argument("--ray-address", metavar="ADDRESS",
                     help="join this existing Ray cluster (HOST:PORT) instead of a private one on 127.0.0.1; "
                          "its security is its operator's (README: network exposure)")
    sim.add_argument("--client-app", default="client.app:app", metavar="MODULE:ATTR",
                     help="ClientApp to simulate (default client.app:app; e.g. a wrapper that injects faults)")
    sim.set_defaults(func=cmd_simulate)
    budget = sub.add_parser("budget", help="a client's privacy ledger: history, spent and remaining epsilon")
    budget.add_argument("ledger", help="a ledger.json file or a directory holding site ledgers")
    budget.add_argument("--json", action="store_true", help="machine-readable output")
    budget.add_argument("--html", nargs="?", const="", metavar="OUT",
                        help="write a self-contained HTML page instead (default OUT: budget.html next to the ledger)")
    budget.set_defaults(func=cmd_budget)
    confirm = sub.add_parser("confirm-data", help="a site operator accepts the site's changed records in its ledger")
    confirm.add_argument("node_config", metavar="NODE_CONFIG.toml", help="the site's node config")
    confirm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="the task's fields, as the federation's run config sets them (e.g. data.task=label)")
    confirm.set_defaults(func=cmd_confirm_data)
    report = sub.add_parser("report", help="privacy budget report of a run: report.json, report.html, plots/")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    report.set_defaults(func=cmd_report)
    audit_cmd.add_parser(sub)
    compare = sub.add_parser("compare", help="runs side by side: eval loss, bytes per client and round, epsilon")
    compare.add_argument("runs", nargs="+", help="run directories")
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    compare.set_defaults(func=cmd_compare)
    export = sub.add_parser("export", help="merge a run's adapter into the base; write GGUF files + manifests")
    export.add_argument("run_dir")
    export.add_argument("--quant", default="q8_0,q4_0", help="comma-separated: q8_0, q4_0, f16 ('' = merged dir only)")
    export.add_argument("--round", type=int, help="adapter round to export (default: the last)")
    export.set_defaults(func=cmd_export)
    chat = sub.add_parser("chat", help="chat with a shipped GGUF or a merged model directory")
    chat.add_argument("model", help="a .gguf file or an HF model directory")
    chat.add_argument("--prompt", help="one-shot: answer this and exit (else read lines from stdin)")
    chat.add_argument("--max-new-tokens", type=int, default=200)
    chat.set_defaults(func=cmd_chat)
    data = sub.add_parser("data", help="what each simulated client would get from a data file (no model weights)")
    data.add_argument("file", help="a JSONL / CSV / TSV / Parquet file (sets data.path)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    data.add_argument("--clients", type=int, help="number of simulated clients (default: the scenario's)")
    data.add_argument("--scenario", default="hospital", help="tiny | hospital | phone (default: hospital)")
    data.set_defaults(func=cmd_data)
    flwr_run = sub.add_parser("flwr-run", help="Flower's `flwr run .` simulation without dependency installation, "
                                               "on a private SuperLink that is stopped afterwards")
    flwr_run.add_argument("--supernodes", type=int, default=4, help="simulated SuperNodes (clients)")
    flwr_run.add_argument("--run-config", default="", help='Flower run config, e.g. "model.name=\'tiny\' server.rounds=1"')
    flwr_run.add_argument("--keep-home", action="store_true", help="keep the private FLWR_HOME (SuperLink logs)")
    flwr_run.set_defaults(func=cmd_flwr_run)
    warm = sub.add_parser("warm-start", help="the coordinator trains the starting adapter on a PUBLIC file, no site's "
                                             "data (a run starts from it with server.initial-adapter)")
    warm.add_argument("file", help="a public JSONL / CSV / TSV / Parquet file with the run's task and fields")
    warm.add_argument("--out", required=True, help="a new directory for the adapter and warm_start.json")
    warm.add_argument("--scenario", default="hospital", help="the run's scenario (model, LoRA, task; default hospital)")
    warm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's config keys")
    warm.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    warm.add_argument("--batch-size", type=int, default=8, help="expected batch (default 8)")
    warm.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    warm.set_defaults(func=cmd_warm_start)
    keys = sub.add_parser("keys", help="list every config key with its default, by concept")
    keys.add_argument("--toml", action="store_true", help="the defaults as pyproject.toml's [tool.flwr.app.config]")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.func is not cmd_simulate:  # simulate checks its run directory first, before anything heavy
            quiet_libraries()
        return args.func(args)
    except (UserError, LedgerError) as err:
        print(f"fedslm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedslm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
