"""HTML for people: the run report and a client's own budget page, from the same building blocks.

Self-contained on purpose: a compliance officer gets one file by mail and opens it on a
machine without network access. CSS is inline, figures are PNG data URIs, and nothing
refers to any URL. Every value from a run directory is escaped (client names and
reasons come from the clients).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from privacy.audit.doc import audit_sentences
from privacy.report import plots
from privacy.report.neighbouring import STATEMENT
from privacy.report.text import EPSILON_HELP, fmt_budget, fmt_delta, protection_notes

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232b;
       max-width: 1120px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 30px 0 10px; border-bottom: 2px solid #dde3ea; }
.meta { color: #5b6673; font-size: 13px; }
.banner { padding: 12px 16px; border-radius: 6px; margin: 14px 0; font-weight: 600; }
.partial { background: #fde8e8; border: 2px solid #c0392b; color: #7b1f16; font-size: 17px; }
.ok { background: #e8f6ec; border: 1px solid #58a86b; } .warn { background: #fff4d6; border: 1px solid #d9a400; }
.summary { background: #f5f8fb; border: 1px solid #dde3ea; border-radius: 8px; padding: 6px 20px 12px; }
.summary li { margin: 6px 0; } .help { color: #4a5561; font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { border: 1px solid #d4dbe3; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; } tr:nth-child(even) td { background: #fafbfc; }
td:first-child { white-space: nowrap; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bad { color: #b3261e; font-weight: 600; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(500px, 1fr)); gap: 12px; }
figure { margin: 0; } figure.single { max-width: 660px; } figure img { width: 100%; border: 1px solid #e3e7ec; }
figcaption { font-size: 13px; color: #4a5561; }
dl dt { font-weight: 600; margin-top: 10px; } dl dd { margin: 2px 0 0 0; }
details pre { font-size: 12px; background: #f5f7f9; padding: 10px; overflow-x: auto; }
"""


# ---- building blocks -----------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, parts: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><div class=\"meta\">{esc(subtitle)}</div>"
            + "".join(parts) + "</body></html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{esc(title)}</h2>" + "".join(parts)


def banner(text: str, kind: str) -> str:
    return f'<div class="banner {kind}">{esc(text)}</div>'


def paragraphs(texts: list[str], css: str = "") -> str:
    return "".join(f'<p class="{css}">{esc(t)}</p>' if css else f"<p>{esc(t)}</p>" for t in texts)


def bullets(texts: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(t)}</li>" for t in texts) + "</ul>"


def table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """Cells are escaped; a cell given as ("bad", text) is shown as a warning."""
    def cell(i, value):
        css = " ".join(c for c in ("n" if i in numeric else "", "bad" if isinstance(value, tuple) else "") if c)
        text = value[1] if isinstance(value, tuple) else value
        return f'<td class="{css}">{esc(text)}</td>' if css else f"<td>{esc(text)}</td>"
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows) + "</table>")


def figure(png: bytes, alt: str, caption: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure class="{css}"><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def definitions(notes: list[dict]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(n['topic'])}</dt><dd>{esc(n['text'])}</dd>" for n in notes) + "</dl>"


def collapsed(summary: str, text: str) -> str:
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


def eps(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def num(value, spec: str = "g") -> str:
    return "—" if value is None else format(value, spec)


# ---- the run report ------------------------------------------------------------------
CAPTIONS = {
    "epsilon": "Cumulative sample-level epsilon of each client after each round (PRV accountant), with the "
               "budgets as dashed lines. Round 0 shows what was spent before this run.",
    "noise": "Noise multiplier sigma each client chose per round (the server's request is a floor; a client may "
             "add more). An x on the axis marks a refused round.",
    "utility": "Evaluation loss on held-out records after each round: the federation (bold) and each client; "
               "round 0 is the untrained adapter.",
    "privacy_utility": "This run in the privacy-utility plane: the weakest client guarantee (largest epsilon) "
                       "against the evaluation loss, after each round; the star is the final model.",
}


def render_report(doc: dict, figures: dict[str, bytes]) -> str:
    run, summary = doc["run"], doc["summary"]
    parts = [banner(summary["partial"], "partial")] if summary["partial"] else []
    parts.append('<div class="summary"><h2>Summary</h2>' + paragraphs(summary["what"])
                 + "<p><b>Privacy guarantees</b></p>" + bullets(summary["guarantees"])
                 + paragraphs([summary["check"]] + ([summary["audit"]] if summary.get("audit") else []))
                 + paragraphs([summary["how_to_read"]], "help") + "</div>")
    secret = doc.get("per_client_statistics")
    secret_banner = banner(secret["text"], "warn") if secret else ""
    parts.append(section("Per-client privacy", secret_banner,
                         paragraphs([f"Sample-level ε: {STATEMENT}. Replace-one ε: one record swapped for another "
                                     "(same δ; see 'Accounting check')."], "help"),
                         _client_table(doc["clients"]), _round_table(doc["clients"])))
    if figures:
        parts.append(section("Plots", secret_banner, '<div class="figs">' + "".join(
            figure(png, name, CAPTIONS[name]) for name, png in figures.items()) + "</div>"))
    if doc["utility"].get("shipped"):
        parts.append(_shipped_section(doc["utility"]))
    if doc["user_level"]:
        parts.append(_user_section(doc["user_level"], secret))
    parts.append(_accounting_section(doc))
    parts.append(section("What is and is not protected", definitions(doc["protection"])))
    parts.append(_audit_section(doc["audit"]))
    parts.append(section("Run details", _settings(run), _events(run), collapsed(
        "report.json (every number in this page)", json.dumps({k: v for k, v in doc.items() if k != "summary"},
                                                              indent=1))))
    return page(f"Privacy report: run {run['id']}",
                f"{run['dir']} · generated {doc['generated']} · {doc['schema']}", parts)


def _shipped_section(utility: dict) -> str:
    """The exported files as the clients evaluated them, against the untrained base (privacy.report.shipped)."""
    fp32 = {ship["round"]: (ship.get("fp32") or {}).get("eval_loss") for ship in utility["shipped"]}
    kinds = {"fp32": "(adapter on the fp32 base)", "base": "one-time install", "adapter": "per update"}
    rows = []
    for r in utility["shipped_vs_base"]:
        loss, reference = r["eval_loss"], fp32.get(r["round"])
        change = f"{(loss / reference - 1) * 100:+.2f}%" if reference and loss is not None else ""
        size = f"{r['bytes'] / 1e6:.2f} MB" if r.get("bytes") else ""
        versus = "" if r["vs_round0"] is None else f"{r['vs_round0']:+.4f}" + (" WORSE" if r["worse_than_base"] else "")
        own = "" if r["vs_device_base"] is None else f"{r['vs_device_base']:+.4f}"
        rows.append([r["round"], r["model"], num(loss, ".4f"), change, versus, own, size, kinds.get(r["role"], ""),
                     (r.get("sha256") or "")[:16]])
    flags = "".join(banner(flag, "warn") for flag in utility["shipped_worse_than_base"])
    return section("Shipped models", flags, paragraphs([
        "After training, the files were sent to every evaluating client, which checked each sha256, stored the file "
        "and evaluated it on its own held-out records; only these metrics came back. 'merged' files are whole models; "
        "'base q…' is the untrained base in that quantization, installed once; 'adapter+q…' is the adapter file "
        "applied by each device on that base. 'vs round-0 base': eval loss minus the untrained base's (round 0); "
        "a shipped model above it is worse than what the device already had. 'vs device base': the adapter's gain "
        "on the quantized base the device holds."]),
        table(["round", "model", "eval loss", "vs fp32", "vs round-0 base", "vs device base", "size", "sent",
               "sha256"], rows, numeric={0, 2, 3, 4, 5}))


def _client_table(clients: dict) -> str:
    rows = []
    for name, c in clients.items():
        if not c["trained"]:
            rows.append([name, "—", "—", "not trained in this run", "", "", "", "", "", "", "", "", ""])
            continue
        sigmas = " / ".join(f"{s:.3g}" for s in c["noise_multipliers"].values()) or "—"
        refused = ", ".join(f"round {r['round']}" for r in c["refused"]) or "none"
        if c["dp"]:
            prv, rdp = eps(c["epsilon"]) + ("" if c["recomputed"] else " (reported)"), eps(c["epsilon_rdp"])
        else:
            prv, rdp = ("bad", "no DP"), ("bad", "no DP")
        replace = eps(c.get("epsilon_replace_one")) if c["dp"] else ("bad", "no DP")
        rows.append([name, num(c["records"]), fmt_delta(c["delta"]) if c["delta"] else "—", sigmas,
                     num(c["clip_norm"]), _rate(c["sample_rate"]), c["steps"], prv, rdp, replace, num(c["budget"]),
                     num(c["remaining"], ".3f"), ("bad", refused) if c["refused"] else refused])
    head = ["client", "records (in clear)", "delta", "sigma per round", "clip C", "sample rate q", "steps",
            "eps (PRV)", "eps (RDP)", "eps replace-one", "budget", "remaining", "refused"]
    return table(head, rows, numeric={1, 2, 4, 5, 6, 7, 8, 9, 10, 11})


def _rate(value) -> str:
    if value is None:
        return "—"
    return " / ".join(f"{v:.4f}" for v in value) if isinstance(value, list) else f"{value:.4f}"


def _round_table(clients: dict) -> str:
    rows = []
    for name, c in clients.items():
        if not c.get("dp", True):  # no sample-level DP: nothing per round to recompute (the client table says so)
            continue
        for r in c.get("rounds", []):
            if r.get("agrees"):
                check = "yes"
            elif r.get("epsilon_reported") is None:
                check = "n/a"
            else:
                check = "includes earlier spend" if r.get("reported_outside_spend") else ("bad", "NO")
            rows.append([name, r["round"], r["status"], f"{r['noise_multiplier']:.4g}", f"{r['clip_norm']:g}",
                         f"{r['sample_rate']:.4f}", r["steps"], eps(r["epsilon"]), eps(r["epsilon_rdp"]),
                         eps(r.get("epsilon_reported")), check, r.get("reason", "")])
    if not rows:
        return ""
    head = ["client", "round", "status", "sigma", "C", "q", "steps", "eps PRV", "eps RDP", "reported", "agrees",
            "reason"]
    if not any(row[-1] for row in rows):
        head, rows = head[:-1], [row[:-1] for row in rows]
    return ("<p>Every round, recomputed from the events (cumulative epsilon after the round) next to what the "
            "client reported:</p>" + table(head, rows, numeric={1, 3, 4, 5, 6, 7, 8, 9}))


def _user_section(user: dict, secret: dict | None) -> str:
    rows = [[r["round"], r.get("eligible", "—"), r.get("cohort", "—"), eps(r["epsilon"]), eps(r.get("epsilon_reported"))]
            for r in user["rounds"]]
    return section(
        "User-level DP (whole clients, on the server)",
        paragraphs([f"{user['mechanism']}: each client's update is clipped to L2 norm S = {user['clip_norm']:g}, "
                    f"each client is sampled independently with probability q = {user['sample_rate']:g} per round, "
                    f"and Gaussian noise with multiplier z = {user['noise_multiplier']:g} is added to the mean "
                    f"(std z·S / expected cohort). User-level (ε, δ) = ({eps(user['epsilon'])}, "
                    f"{fmt_delta(user['delta'])}) after {len(user['rounds'])} round(s), PRV accountant, under "
                    "adding or removing one whole client."]),
        banner(secret["text"], "warn") if secret else "",
        table(["round", "eligible clients", "cohort", "user-level eps", "reported"], rows, numeric={0, 1, 2, 3, 4}))


def _audit_section(audit: dict | None) -> str:
    """The empirical audit (privacy.audit.doc): plain words, one row per trial, the method."""
    if audit is None:
        return section("Empirical audit", paragraphs([(
            "No empirical audit was run for this run: the epsilons above are proven upper bounds, not measurements. "
            "`fedslm audit --run RUN_DIR` trains one client with canaries using this run's settings and adds the "
            "audit to this report.")]))
    broken = [t for t in audit["trials"] if t["verdict"] == "violation"]
    status = (banner(f"{len(broken)} trial(s) with a lower bound ABOVE the reported epsilon: the privacy claim is "
                     "false (a bug in the mechanism or its accounting).", "partial") if broken else
              banner("No trial's lower bound exceeds its reported epsilon.", "ok"))
    sentences = audit_sentences(audit)
    rows = []
    for t in audit["trials"]:
        bound, exp, member = t["bound"], t.get("exposure"), t["membership"]
        inside, outside = (exp["inserted"], exp["not_inserted"]) if exp else ({}, {})
        rows.append([t["name"], f"{t['noise_multiplier']:.3g}", eps(t["epsilon"]), fmt_delta(t["delta"]),
                     f"{bound['epsilon_lower']:.3f}", f"{bound['max_provable']:.2f}",
                     f"{bound['best']['correct']} / {bound['best']['guesses']}",
                     f"{member['inserted']['mean']:.3f} / {member['not_inserted']['mean']:.3f}"
                     if member["inserted"]["count"] and member["not_inserted"]["count"] else "—",
                     _exposure_cell(inside), _exposure_cell(outside),
                     ("bad", t["verdict"]) if t["verdict"] in ("violation", "no leak detected") else t["verdict"]])
    head = ["trial", "sigma", "reported eps (PRV)", "delta", f"eps lower bound ({1 - audit['method']['beta']:.0%})",
            "at most provable", "guesses right", "score in / out (mean)", "exposure inserted: mean / median / max",
            "exposure left out: mean / median / max", "verdict"]
    method = audit["method"]
    return section("Empirical audit", status, paragraphs(sentences[:1]), table(head, rows, numeric={1, 2, 3, 4, 5, 6, 7}),
                   bullets(sentences[1:]), paragraphs([
                       "Exposure in bits, extrapolated (sampled in brackets). Membership score: " + method["score"],
                       "Lower bound: " + method["bound"], "Exposure: " + method["exposure"]], "help"))


def _exposure_cell(group: dict) -> str:
    if not group or not group["sampled"]["count"]:
        return "—"
    ext, smp = group["extrapolated"], group["sampled"]
    return (f"{ext['mean']:.1f} / {ext['median']:.1f} / {ext['max']:.1f} "
            f"({smp['mean']:.1f} / {smp['median']:.1f} / {smp['max']:.1f})")


def _accounting_section(doc: dict) -> str:
    acc = doc["accounting"]
    status = (banner("Every epsilon recomputed from the stored events agrees with the reported one.", "ok")
              if not acc["disagreements"] else banner(f"{len(acc['disagreements'])} disagreement(s):", "warn")
              + bullets(acc["disagreements"]))
    sources = [f"{name}: events from {c['source']}" for name, c in doc["clients"].items() if c.get("trained")]
    return section("Accounting check", status, paragraphs([
        "Accountant: PRV (Gopi et al. 2021, through Opacus), the reported numbers; RDP (Mironov et al. 2019) as a "
        "looser cross-check. Each DP-SGD step is a Poisson-subsampled Gaussian mechanism; a client's epsilon "
        "composes every step of every round and run on the same data. No amplification from client selection.",
        f"Neighbouring relation: {STATEMENT}. Replace-one ε (one record swapped for another, the count unchanged) "
        f"is shown next to it: {acc['replace_one']}. Group privacy gives the cruder bound (2ε, 2e^ε·δ)."]),
        bullets(sources))


def _settings(run: dict) -> str:
    training, asked = run["training"], run["dp_asked"]
    rows = [["model", run["model"]], ["task", run["task"]], ["data", f"{run['data']}, {run['partition']}"],
            ["LoRA", f"rank {run['lora']['r']}, alpha {run['lora']['alpha']}, on {run['lora']['target_modules']}"],
            ["aggregation", run["aggregation"] or "not recorded (the run predates server.aggregation)"],
            ["rounds", f"{run['rounds_completed']} of {run['rounds_planned']} planned"],
            ["local training", f"{training['local_steps']} DP-SGD steps per round, expected batch "
                               f"{training['batch_size']}, learning rate {training['lr']:g}"],
            ["DP asked by the server", f"target epsilon {asked['target_epsilon']:g} over the planned rounds, "
                                       f"sigma floor {asked['noise_multiplier']:g}, clip {asked['clip_norm']:g}"
             if run["dp_enabled"] else "off"]]
    return table(["setting", "value"], rows)


def _events(run: dict) -> str:
    if not run["events"]:
        return paragraphs(["events.jsonl: none recorded."])
    rows = [[e.get("time", ""), e.get("event", ""),
             ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("time", "event"))] for e in run["events"]]
    return table(["time", "event", "details"], rows)


# ---- a client's own ledger -----------------------------------------------------------
def write_budget_html(statements: list[dict], out: Path) -> Path:
    """Write the budget page atomically (a half-written page must never look complete)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_budget(statements), encoding="utf-8")
    os.replace(tmp, out)
    return out


def render_budget(statements: list[dict]) -> str:
    """One page for one or more ledgers (privacy.report.statement.statement documents)."""
    parts = [paragraphs([EPSILON_HELP], "help")] + [_ledger_section(doc) for doc in statements]
    parts.append(section("What is and is not protected",
                         definitions(protection_notes(seeds=None, aggregation=None, user=None))))
    return page("Privacy budget of a client's data", "generated by fedslm budget --html from the local ledger; "
                "nothing in it was sent to the server", parts)


def _ledger_section(doc: dict) -> str:
    spent, budget, remaining = doc["spent_epsilon"], doc["max_epsilon"], doc["remaining_epsilon"]
    sentence = (f"Each of the {doc['dataset']['records']} records of this dataset is protected with (ε, δ) = "
                f"({spent:.2f}, {fmt_delta(doc['delta'])}) over everything recorded in this ledger; "
                f"{fmt_budget(budget, remaining)}. This is {doc['statement']}. Under replacing one record by another "
                f"(the count unchanged): ε = {doc['spent_epsilon_replace_one']:.2f} at the same δ.")
    rows, mismatches = [], 0
    for r in doc["entries"]:
        stored, recomputed = r["epsilon_after"], r["epsilon_recomputed"]
        differs = r["status"] != "refused" and abs(stored - recomputed) > 1e-3
        mismatches += differs
        rows.append([r["run_id"], r["round"], r["status"], f"{r['noise_multiplier']:.4g}", f"{r['clip_norm']:g}",
                     f"{r['sample_rate']:.4f}", r["steps"], f"{recomputed:.3f}", f"{r['epsilon_rdp_recomputed']:.3f}",
                     ("bad", f"{stored:.3f}") if differs else f"{stored:.3f}", f"{r['max_epsilon']:g}", r["reason"]])
    check = (banner("Every stored epsilon agrees with the one recomputed from the ledger's events.", "ok")
             if not mismatches else banner(f"{mismatches} stored epsilon(s) differ from the recomputed ones.", "warn"))
    ledger = Path(doc["ledger"])
    return section(
        f"{ledger.parent.name}: dataset {doc['dataset']['fingerprint'][:16]}",
        paragraphs([f"Ledger file {ledger}"], "meta"),
        '<div class="summary">' + paragraphs([sentence]) + "</div>",
        check,
        figure(_ledger_plot(doc), "epsilon", "Cumulative epsilon after each ledger entry (PRV), with the budget "
               "dashed; entry 0 is the empty ledger.", "single"),
        table(["run", "round", "status", "sigma", "C", "q", "steps", "eps PRV", "eps RDP", "stored", "budget",
               "reason"], rows, numeric={1, 3, 4, 5, 6, 7, 8, 9, 10}))


def _ledger_plot(doc: dict) -> bytes:
    points = [(0, 0.0)] + [(i, r["epsilon_recomputed"]) for i, r in enumerate(doc["entries"], 1)]
    return plots.epsilon_plot({"this dataset": points}, {"this dataset": doc["max_epsilon"]}, len(points) - 1,
                              xlabel="ledger entry")
