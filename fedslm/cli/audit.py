"""``fedslm audit``: the empirical privacy audit (privacy.audit.run) from the command line.

Trains one client alone, with canaries in its data, once without noise and once per
target epsilon, using the client's own DP-SGD code (client.train.train_adapter) and the
settings of the configuration (defaults, ``--set``, or a run's config.json with ``--run``);
writes ``audit.json`` and prints one line per trial. With ``--run RUN_DIR`` the audit goes
into that run directory and its privacy report is rewritten to include it.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig

AUDITED = {"dp.enabled": True}  # an audit trains as a DP site does, whatever the run asked (its "auto" = ffa)


def add_parser(sub) -> None:
    audit = sub.add_parser("audit", help="empirical privacy audit: canaries, exposure, one-run epsilon lower bound")
    audit.add_argument("--model", help="'smollm2' (default), 'tiny' or a local HF model directory")
    audit.add_argument("--run", metavar="RUN_DIR", help="audit with this run's settings and write the audit into it "
                       "(its report then includes the audit)")
    audit.add_argument("--out", help="directory for audit.json (default: runs/audit-<time>; with --run: RUN_DIR)")
    audit.add_argument("--canaries", type=int, default=128, help="m: canaries, each inserted with probability 1/2")
    audit.add_argument("--digits", type=int, default=8, help="digits per secret (|R| = 10^digits; default 8)")
    audit.add_argument("--epsilon", type=float, action="append", metavar="E",
                       help="target epsilon of a DP trial (repeatable; default dp.target-epsilon, i.e. 8)")
    audit.add_argument("--no-baseline", action="store_true", help="skip the sigma=0 trial (clipping, no noise)")
    audit.add_argument("--no-dp", action="store_true", help="only the sigma=0 trial (e.g. to tune steps and lr)")
    audit.add_argument("--steps", type=int, default=160, help="DP-SGD steps per trial (default 160)")
    audit.add_argument("--lr", type=float, help="learning rate (default train.lr)")
    audit.add_argument("--batch-size", type=int, help="expected Poisson batch (default train.batch-size)")
    audit.add_argument("--clip-norm", type=float, help="per-example clip norm (default dp.clip-norm)")
    audit.add_argument("--base-records", type=int, default=0,
                       help="also train on this many real records of the configured data (default 0: canaries only)")
    audit.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the lower bound (default 0.05)")
    audit.add_argument("--candidates", type=int, default=127, help="sampled secrets per exposure (default 127)")
    audit.add_argument("--exposure-canaries", type=int, default=8,
                       help="canaries per group (inserted / left out) whose exposure is measured (default 8)")
    audit.add_argument("--seed", type=int, default=0, help="canaries, inclusion, sampling and noise (default 0)")
    audit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    audit.add_argument("--json", action="store_true", help="print audit.json instead of the summary")
    audit.set_defaults(func=cmd_audit)


def cmd_audit(args) -> int:
    from privacy.audit.doc import audit_sentences
    from privacy.audit.run import AuditSpec

    config, out, run_dir = _config(args)
    specs = RunConfig.parse(config)
    try:
        spec = AuditSpec(canaries=args.canaries, digits=args.digits, steps=args.steps,
                         batch_size=_given(args.batch_size, specs.train.batch_size),
                         lr=_given(args.lr, specs.train.lr), clip_norm=_given(args.clip_norm, specs.dp.clip_norm),
                         epsilons=() if args.no_dp else tuple(args.epsilon or [specs.dp.target_epsilon or 8.0]),
                         baseline=not args.no_baseline, beta=args.beta, candidates=args.candidates,
                         exposure_canaries=args.exposure_canaries, seed=args.seed)
    except ValueError as err:
        raise UserError(f"audit: {err}") from None
    doc = run(specs, spec, base_records=args.base_records, log=lambda line: print(f"[fedslm] {line}", flush=True))
    from fedslm.common.jsonfiles import write_json_atomic

    write_json_atomic(out / "audit.json", doc)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print("\n".join(f"[fedslm] {s}" for s in audit_sentences(doc)))
    print(f"[fedslm] audit: {out / 'audit.json'} ({doc['seconds']:.0f}s)", flush=True)
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        from privacy.report.build import write_report

        print(f"[fedslm] privacy report with the audit: {write_report(run_dir)}", flush=True)
    return 1 if any(t["verdict"] == "violation" for t in doc["trials"]) else 0


def audit_task(specs: RunConfig):
    """Canaries are SFT records: the run's prompt and response fields, at its window (model.max-length 0, fitted
    to data the audit does not read, is the cap, as at a deployed site)."""
    from slm.tasks import Task

    task = specs.task
    return Task(kind="sft", max_length=specs.model.window, prompt_field=task.prompt_field,
                response_field=task.response_field)


def run(specs: RunConfig, spec, *, base_records: int = 0, log=print, train=None) -> dict:
    """The audit of ``specs``' client training (``train`` defaults to the client's own)."""
    from client.train import train_adapter
    from privacy.audit.run import run_audit
    from slm.lora import LoraSpec, attach

    if specs.task.task != "sft" and base_records:
        raise UserError("audit --base-records: needs sft data (data.task=sft); canaries are sft records")
    task = audit_task(specs)
    base = _base_records(specs, base_records)
    lora = LoraSpec.of(specs.lora)
    model, tokenizer = attach(specs.model.name, lora, specs.model.dtype)
    aggregation = specs.server.aggregation  # resolved as under DP: the audit's config has dp.enabled true
    describe = {"model": specs.model.name, "dtype": specs.model.dtype,
                "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": ",".join(lora.target_modules),
                         "seed": lora.seed},
                "aggregation": aggregation}
    options = {"grad_sample_mode": specs.train.grad_sample_mode, "autocast": specs.train.autocast}  # the client's own
    describe["trainer_options"] = options
    try:
        return run_audit(model, tokenizer, task, spec, train=train or functools.partial(train_adapter, **options),
                         base_records=base, delta=specs.dp.delta or None,
                         freeze_a=aggregation == "ffa", describe=describe, log=log)
    except ValueError as err:
        raise UserError(f"audit: {err}") from None


def _given(value, default):
    return default if value is None else value


def _config(args) -> tuple[dict, Path, Path | None]:
    from fedslm.common.config import parse_assignment, resolve

    overrides = dict(parse_assignment(item) for item in args.set)
    if args.model:
        overrides["model.name"] = args.model
    run_dir = None
    if args.run:
        run_dir = Path(args.run).expanduser().resolve()
        path = run_dir / "config.json"
        if not path.is_file():
            raise UserError(f"audit --run {run_dir}: config.json is missing (not a fedslm run directory)")
        from fedslm.common.jsonfiles import read_json

        stored = read_json(path, "run config")
        config = resolve({**{k: v for k, v in stored.items() if k != "run.resume"}, **overrides, **AUDITED})
    else:
        from simulation.scenarios import DEMO_DATA

        config = resolve({**overrides, **AUDITED}, base={"data.path": str(DEMO_DATA)})
    if args.out:
        out = Path(args.out).expanduser().resolve()
    elif run_dir is not None:
        out = run_dir
    else:
        root = RunConfig.parse(config).run.root
        out = Path(root).expanduser().resolve() / f"audit-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, out, run_dir  # created when audit.json is written


def _base_records(specs: RunConfig, count: int) -> list[dict]:
    """The first ``count`` training records of the configured data file, read as one client's whole file."""
    if count <= 0:
        return []
    from client.data import DataSpec, load_local_data

    local = load_local_data(DataSpec.of(specs), 0, 1)
    if len(local.train) < count:
        raise UserError(f"audit --base-records {count}: the data file has only {len(local.train)} training records")
    return list(local.train[:count])
