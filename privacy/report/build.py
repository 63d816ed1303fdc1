"""The privacy budget report of a run: report.json, report.html and plots/*.png in the run directory.

Two readers: a compliance officer, who needs one page of plain words first (what was
trained, on whose data, how well, and what each client's records are protected with),
and a DP researcher, who needs every parameter and the evidence that the numbers hold.
So the report recomputes every epsilon from the stored events (privacy.report.reconcile) and
flags any disagreement with what the clients reported, and it states what is NOT
protected as plainly as what is.

report.json follows ``SCHEMA``; a field never changes meaning (add fields instead). Top
level: run (what, how far, PARTIAL or not, config, events), summary (the plain-words
page), utility (per round), clients (per client: parameters, recomputed epsilons, budget,
refusals, every round; replace-one epsilons next to the add/remove ones), accounting
(accountants, neighbouring relation, disagreements), user_level (null unless user-level
DP ran), per_client_statistics (null unless user-level DP ran: the per-client tables are
the coordinator's secret material, not covered by the user-level guarantee), protection
(what is and is not protected), audit (the empirical audit,
privacy.audit.doc schema fedslm-audit/1, from <run>/audit.json; null when none was run;
summary.audit is its one sentence), secure_aggregation (null unless the sites' updates were summed
with SecAgg+: what the coordinator learned, per round the cohort, threshold and sites in
the sum), plots (file names under plots/).
Non-finite numbers are written as null: epsilon is null when a client trained without
DP (no guarantee at all) or when it could not be recomputed (see "disagreements").
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from fedslm.common.jsonfiles import finite, write_json_atomic
from privacy.audit.doc import read_audit, summary_sentence
from privacy.report import plots
from privacy.report.html import render_report
from privacy.report.neighbouring import GROUP_METHOD, RELATION, REPLACE_ONE_METHOD, STATEMENT
from privacy.report.reconcile import ClientAccount, UserLevelAccount, account_client, account_user_level
from privacy.report.run_files import RunFiles
from privacy.report.secure_aggregation import secure_aggregation_doc, secure_note
from privacy.report.shipped import compare_shipped
from privacy.report.text import (
    PER_CLIENT_SECRET,
    describe_run,
    protection_notes,
    starting_adapter_note,
    summary_sentences,
)

SCHEMA = "fedslm-report/1"
ACCURACY_KEYS = ("accuracy", "top1_accuracy", "top3_accuracy")
FIGURES = ("epsilon", "noise", "utility", "privacy_utility")


def write_report(run_dir: str | Path) -> Path:
    """Write report.json, report.html and plots/*.png into ``run_dir``; return the HTML's path."""
    doc, figures = build_report(run_dir)
    path = Path(doc["run"]["dir"])
    (path / "plots").mkdir(exist_ok=True)
    for name in FIGURES:  # a figure a rerun no longer draws must not survive from an earlier report
        (path / "plots" / f"{name}.png").unlink(missing_ok=True)
    for name, png in figures.items():
        (path / "plots" / f"{name}.png").write_bytes(png)
    write_json_atomic(path / "report.json", doc)
    html = path / "report.html"
    tmp = html.with_suffix(".html.tmp")
    tmp.write_text(render_report(doc, figures), encoding="utf-8")
    os.replace(tmp, html)
    return html


def build_report(run_dir: str | Path) -> tuple[dict, dict[str, bytes]]:
    """(the report document, its figures as PNG bytes by name)."""
    files = RunFiles.read(run_dir)
    run = describe_run(files)
    utility = _utility(files.rows)
    accounts = {name: account_client(name, records, files.ledgers.get(name), files.run_id)
                for name, records in sorted(files.view["clients"].items())}
    user = account_user_level(files.rows)
    eval_records = {n: m.get("num-examples") for n, m in files.rows[0].get("eval_clients", {}).items()}
    idle = sorted(set(eval_records) - set(accounts))
    clients = {name: _client_doc(a, eval_records.get(name)) for name, a in accounts.items()}
    clients.update({name: {"trained": False, "eval_records": eval_records[name]} for name in idle})
    disagreements = [d for a in accounts.values() for d in a.disagreements] + (user.disagreements if user else [])
    doc = {
        "schema": SCHEMA,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "summary": summary_sentences(run, utility, accounts, idle, user, disagreements),
        "utility": utility,
        "clients": clients,
        "accounting": {"accountant": "prv", "cross_check": "rdp", "sampling": "poisson",
                       "sample_level_unit": "one training record of one client" if all(
                           not a.unit_level for a in accounts.values()) else
                       "per client (clients.<name>.unit): one record, or one privacy unit with all of its records",
                       "neighbouring_relation": RELATION, "record_count_in_clear": True, "statement": STATEMENT,
                       "replace_one": REPLACE_ONE_METHOD, "group": GROUP_METHOD,
                       "units": sorted({a.unit for a in accounts.values()}),
                       "client_selection_amplification": False, "disagreements": disagreements},
        "user_level": _user_doc(user),
        "per_client_statistics": _per_client_doc(user),
        "protection": protection_notes(seeds={r.get("noise_seed") for a in accounts.values() for r in a.rounds},
                                       generators={r.get("noise_generator") for a in accounts.values()
                                                   for r in a.rounds},
                                       units={a.unit for a in accounts.values() if a.dp},
                                       aggregation=run["aggregation"], user=user,
                                       server_noise_seed=files.specs.server.noise_seed,
                                       dp_enabled=run["dp_enabled"],
                                       train_metrics_in_clear=_train_metrics_in_clear(files.rows)),
        "audit": read_audit(files.path),  # <run>/audit.json of `fedslm audit --run`, else None
        "secure_aggregation": secure_aggregation_doc(files.specs.server, files.rows),  # null when updates were in clear
    }
    doc["protection"].append(secure_note(doc["secure_aggregation"]))
    if files.start is not None:
        doc["protection"].append(starting_adapter_note(files.start))
    doc["summary"]["audit"] = summary_sentence(doc["audit"]) if doc["audit"] else None
    figures = _figures(utility, accounts, user, max(run["rounds_planned"], run["rounds_completed"]))
    doc["plots"] = {name: f"plots/{name}.png" for name in figures}
    return finite(doc), figures


def _utility(rows: list[dict]) -> dict:
    """Per-round utility; rows with "shipped" are evaluations of the exported files, kept apart."""
    rounds, shipped = [], []
    for row in rows:
        if "shipped" in row:
            shipped.append({"round": row["round"], **{name: {"eval_loss": m.get("eval_loss"), "bytes": m.get("bytes"),
                                                             "sha256": m.get("sha256"), "role": m.get("role")}
                                                      for name, m in row["shipped"].items()}})
            continue
        entry = {"round": row["round"], "skipped": bool(row.get("skipped")),
                 "eval_loss": row.get("eval_loss"), "train_loss": row.get("train_loss"),
                 "eval_clients": {n: m.get("eval_loss") for n, m in row.get("eval_clients", {}).items()}}
        entry.update({k: row[k] for k in ACCURACY_KEYS if k in row})
        rounds.append(entry)
    evaluated = [r for r in rounds if _is_number(r["eval_loss"])]
    first = evaluated[0] if evaluated and evaluated[0]["round"] == 0 else None
    last = evaluated[-1] if evaluated and evaluated[-1]["round"] > 0 else None
    comparison, flags = compare_shipped(shipped, first["eval_loss"] if first else None)
    return {"rounds": rounds, "metric": "eval_loss (token-weighted mean over the clients' held-out records)",
            "round0": first, "final": last, "shipped": shipped, "shipped_vs_base": comparison,
            "shipped_worse_than_base": flags}


def _client_doc(account: ClientAccount, eval_records: int | None) -> dict:
    spending = [r for r in account.rounds if r["status"] in ("reserved", "committed")]
    return {
        "trained": True, "dp": account.dp, "records": account.records, "eval_records": eval_records,
        "delta": account.delta, "clip_norm": _single([r["clip_norm"] for r in spending]),
        "sample_rate": _single([r["sample_rate"] for r in spending]),
        "noise_multipliers": {str(r["round"]): r["noise_multiplier"] for r in spending},
        "steps": sum(r["steps"] for r in spending),
        "epsilon": account.epsilon, "epsilon_rdp": account.epsilon_rdp,
        "epsilon_run": account.epsilon_run, "epsilon_run_rdp": account.epsilon_run_rdp,
        "epsilon_before": account.epsilon_before, "recomputed": account.recomputable,
        "epsilon_replace_one": account.epsilon_replace_one, "epsilon_run_replace_one": account.epsilon_run_replace_one,
        "budget": account.budget, "remaining": account.remaining, "refused": account.refused,
        "unit": account.unit, "records_per_unit": account.records_per_unit, "units": account.units,
        "group_records": account.group_records or None, "epsilon_group": account.epsilon_group,
        "source": account.source, "disagreements": account.disagreements, "rounds": account.rounds,
    }


def _user_doc(user: UserLevelAccount | None) -> dict | None:
    if user is None:
        return None
    return {"mechanism": "DP-FedAvg, fixed clipping, Poisson client sampling (McMahan et al. 2018)",
            "clip_norm": user.clip_norm, "noise_multiplier": user.noise_multiplier, "sample_rate": user.sample_rate,
            "delta": user.delta, "epsilon": user.epsilon, "rounds": user.rounds}


def _per_client_doc(user: UserLevelAccount | None) -> dict | None:
    """Under user-level DP: which parts of this report the user-level guarantee does NOT cover."""
    if user is None:
        return None
    return {"covered_by_user_level_dp": False, "coordinator_secret": True,
            "user_level_dp_covers": "the released models only (global adapters and the files shipped from them)",
            "tables": ["clients (record counts, privacy records and participation per client and round)",
                       "utility.rounds[].eval_clients (each client's evaluation)",
                       "user_level.rounds (eligible, cohort)", "plots (per-client curves)"],
            "text": PER_CLIENT_SECRET}


def _train_metrics_in_clear(rows: list[dict]) -> bool:
    """Whether metrics.jsonl holds train losses or training times that clients sent (a row may have none)."""
    for row in rows:
        if row.get("train_loss") is not None:
            return True
        for reply in row.get("participants") or []:
            if isinstance(reply, dict) and (reply.get("train_loss") is not None or reply.get("seconds") is not None):
                return True
    return False


def _figures(utility: dict, accounts: dict[str, ClientAccount], user: UserLevelAccount | None,
             rounds: int) -> dict[str, bytes]:
    """The figures that have something to show; ``rounds`` (planned) fixes the x axis, so a partial run looks short."""
    figures = {}
    dp_accounts = {n: a for n, a in accounts.items() if a.dp and a.rounds}
    sites = set(accounts) | {n for r in utility["rounds"] for n in r["eval_clients"]}
    colours = plots.palette(sites)  # one colour per site in every figure
    if dp_accounts:
        series = {n: [(k, _epsilon_after(a, k)) for k in range(rounds + 1) if k <= a.rounds[-1]["round"]]
                  for n, a in dp_accounts.items()}
        user_points = [(0, 0.0)] + [(r["round"], r["epsilon"]) for r in user.rounds] if user else None
        figures["epsilon"] = plots.epsilon_plot(series, {n: a.budget for n, a in dp_accounts.items()}, rounds,
                                                user_points, colours=colours)
        sigmas = {n: [(r["round"], r["noise_multiplier"]) for r in a.rounds if r["status"] != "refused"]
                  for n, a in dp_accounts.items()}
        refused = {n: [r["round"] for r in a.refused] for n, a in dp_accounts.items()}
        figures["noise"] = plots.noise_plot(sigmas, refused, rounds, colours=colours)
    evaluated = [r for r in utility["rounds"] if _is_number(r["eval_loss"])]
    if utility["final"] is None:  # nothing trained was evaluated: a lone round-0 point would only puzzle
        return figures
    per_client = {}
    for r in evaluated:
        for name, loss in r["eval_clients"].items():
            if _is_number(loss):
                per_client.setdefault(name, []).append((r["round"], loss))
    accuracy = {k: [(r["round"], r[k]) for r in evaluated if k in r] for k in ACCURACY_KEYS}
    figures["utility"] = plots.utility_plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated],
                                            per_client, {k: v for k, v in accuracy.items() if v}, rounds,
                                            colours=colours)
    if dp_accounts:
        points = [(max(_epsilon_after(a, r["round"]) for a in dp_accounts.values()), r["eval_loss"], r["round"])
                  for r in evaluated]
        points = [p for p in points if math.isfinite(p[0])]
        if points:
            figures["privacy_utility"] = plots.privacy_utility_plot(points)
    return figures


def _epsilon_after(account: ClientAccount, round_: int) -> float:
    """A client's cumulative epsilon after ``round_``: unchanged through rounds it did not train in."""
    done = [_cumulative(account, r) for r in account.rounds if r["round"] <= round_]
    return done[-1] if done else _known(account.epsilon_before)


def _cumulative(account: ClientAccount, row: dict) -> float:
    """The epsilon the report stands by after a round: the reported one where it exceeds what this run's files give."""
    if account.recomputable:
        return row["epsilon"]
    return max(row["epsilon"], row["epsilon_reported"] or 0.0)


def _known(epsilon_before: float) -> float:
    """Spend before the run, 0 where only the client's ledger knows it (the plot starts where the run starts)."""
    return 0.0 if math.isnan(epsilon_before) else epsilon_before


def _single(values: list):
    """The value when all rounds used the same one, else the list (a reader must see that it varied)."""
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else (distinct or None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
