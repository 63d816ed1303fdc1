"""A client's budget statement: its ledger as a table (people) or JSON (machines).

Epsilon is recomputed from the ledger's events here, not copied from the entries, so
the statement is reproducible from the stored history alone. It is stated under
add/remove-one-record neighbouring, with the record count said to be released in clear,
and the replace-one epsilon next to it (privacy.report.neighbouring).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedslm.common.errors import UserError
from privacy.mechanism.accountant import epsilon
from privacy.mechanism.ledger import LEDGER_FILE, SPENDING, Ledger
from privacy.report.neighbouring import (
    GROUP_METHOD,
    RELATION,
    REPLACE_ONE_METHOD,
    STATEMENT,
    STATEMENT_ASCII,
    epsilon_group,
    epsilon_replace_one,
)


def find_ledgers(path: str) -> list[Path]:
    """A ledger file, or every site ledger (ledger.json) below a directory."""
    target = Path(path)
    if target.is_file():
        return [target]
    if target.is_dir():
        found = sorted(target.rglob(LEDGER_FILE))
        if found:
            return found
        raise UserError(f"ledger directory {path}: holds no {LEDGER_FILE} file")
    raise UserError(f"ledger {path}: not found")


def statement(ledger: Ledger) -> dict:
    rows, events = [], []
    for e in ledger.entries:
        if e.status in SPENDING:
            events.append(e.event())
        rows.append({**e.__dict__, "epsilon_recomputed": epsilon(events, delta=ledger.delta),
                     "epsilon_rdp_recomputed": epsilon(events, delta=ledger.delta, accountant="rdp")})
    spent = epsilon(events, delta=ledger.delta)
    budget = ledger.entries[-1].max_epsilon if ledger.entries else math.nan
    spending = [e for e in ledger.entries if e.status in SPENDING]
    group = max((e.group_records for e in spending), default=0) if ledger.unit == "record" else 0
    return {
        "ledger": str(ledger.path),
        "dataset": {"fingerprint": ledger.fingerprint, "records": ledger.records},
        "unit": ledger.unit,  # record | unit:<field> (the site's own column name: this statement stays at the site)
        "records_per_unit": max((e.records_per_unit for e in spending), default=1),
        "group_records": group or None,
        "spent_epsilon_group": epsilon_group(events, delta=ledger.delta, group=group) if group > 1 else None,
        "group": GROUP_METHOD if group > 1 else None,
        "delta": ledger.delta,
        "accountant": "prv",
        "neighbouring_relation": RELATION,
        "record_count_in_clear": True,
        "statement": STATEMENT,
        "spent_epsilon": spent,
        "spent_epsilon_replace_one": epsilon_replace_one(events, delta=ledger.delta),
        "replace_one": REPLACE_ONE_METHOD,
        "spent_epsilon_rdp": epsilon(events, delta=ledger.delta, accountant="rdp"),
        "max_epsilon": budget,
        "remaining_epsilon": max(budget - spent, 0.0) if not math.isnan(budget) else math.nan,
        "entries": rows,
    }


def render_table(doc: dict) -> str:
    unit = doc.get("unit", "record")
    counted = "records" if unit == "record" else f"units ({unit.removeprefix('unit:')})"
    head = (f"ledger {doc['ledger']}\n"
            f"dataset {doc['dataset']['fingerprint'][:16]}  {counted} {doc['dataset']['records']}  "
            f"delta {doc['delta']:.3g}  accountant PRV (RDP cross-check), Poisson sampling\n")
    cols = f"{'run':<28} {'round':>5} {'status':<9} {'sigma':>7} {'C':>5} {'q':>8} {'steps':>5} {'eps':>8} {'eps rdp':>8} {'max':>6}"
    lines = [head, cols, "-" * len(cols)]
    for r in doc["entries"]:
        lines.append(f"{r['run_id'][:28]:<28} {r['round']:>5} {r['status']:<9} {r['noise_multiplier']:>7.3f} "
                     f"{r['clip_norm']:>5.2g} {r['sample_rate']:>8.4f} {r['steps']:>5} {r['epsilon_recomputed']:>8.3f} "
                     f"{r['epsilon_rdp_recomputed']:>8.3f} {r['max_epsilon']:>6.3g}"
                     + (f"  ({r['reason']})" if r["reason"] else ""))
    lines.append("-" * len(cols))
    lines.append(f"spent eps {doc['spent_epsilon']:.3f} (RDP {doc['spent_epsilon_rdp']:.3f})   "
                 f"budget {doc['max_epsilon']:g}   remaining {doc['remaining_epsilon']:.3f}   at delta {doc['delta']:.3g}")
    if unit == "record":
        lines.append(f"{STATEMENT_ASCII}.")
        one = "record"
    else:
        lines.append(f"(eps, delta)-DP under add/remove-one-unit neighbouring: each unit of '{unit.removeprefix('unit:')}'"
                     f" with ALL of its records (at most {doc['records_per_unit']} used per step); the unit count is "
                     "released in clear.")
        one = "unit"
    lines.append(f"replace-one (one {one} swapped for another, count unchanged): eps "
                 f"{doc['spent_epsilon_replace_one']:.3f} at the same delta (dp_accounting PLD)")
    if doc.get("spent_epsilon_group") is not None:
        lines.append(f"a person with {doc['group_records']} records (the most any one holds, by group-field): eps "
                     f"{doc['spent_epsilon_group']:.3f} at the same delta (group privacy, dp_accounting PLD)")
    return "\n".join(lines)
