"""The report's plain words: what the run did, what each guarantee means, what is not protected.

Written for a reader who is not a DP expert (a hospital's compliance officer): whole
sentences with the numbers in them, no symbol left unexplained. The same sentences go
into report.json, so a machine reading the report and a person reading the page see the
same claims.
"""

from __future__ import annotations

import math
from collections import Counter

from fedslm.common.config import describe_fields
from privacy.report.neighbouring import STATEMENT
from privacy.report.reconcile import ClientAccount, UserLevelAccount
from privacy.report.run_files import RunFiles, aggregated_update

MODELS = {"smollm2": "SmolLM2-135M-Instruct (a 135-million-parameter language model)",
          "tiny": "a tiny 1.2M-parameter test Llama (a smoke test, not a useful language model)"}
TASKS = {"sft": "instruction fine-tuning: answering a prompt, with the loss on the response tokens only",
         "label": "classification: picking a label by its likelihood under the model",
         "next-word": "next-word prediction"}
EPSILON_HELP = ("How to read (ε, δ): smaller ε is stronger protection. Whatever anyone can learn from the trained "
                "model is almost as likely whether or not one given record was in the training data: at most e^ε "
                "times more likely, except with probability δ (\"in or not in\": add/remove-one-record "
                "neighbouring, which does not hide how many records there are). ε ≤ 1 is strong; ε around 8 is what "
                "published DP fine-tuning of language models typically reports.")
PER_CLIENT_SECRET = (
    "Not covered by the user-level guarantee: the per-client statistics in this report — which clients took part "
    "in which round (participation), each client's evaluation results on its held-out records, each client's "
    "privacy records (record count, σ, sample rate, steps, ε), and the cohort sizes per round. "
    "They come from the clients without the server's noise: they are the coordinator's secret material. The "
    "user-level guarantee covers only the released models (the global adapters and the files shipped from them); "
    "keep this report with the coordinator.")


def fmt_delta(delta: float) -> str:
    """1e-05 -> 1e-5, 0.00015625 -> 1.56e-4."""
    return f"{delta:.3g}".replace("e-0", "e-")


def fmt_budget(budget: float, remaining: float) -> str:
    return f"budget {budget:g}, " + ("fully spent" if remaining < 0.005 else f"{remaining:.2f} left")


def describe_run(files: RunFiles) -> dict:
    """What was trained, on what, and how far the run got (PARTIAL when it stopped short)."""
    specs, rows = files.specs, files.rows
    model = specs.model.name
    planned, completed = specs.server.rounds, rows[-1]["round"]
    last = files.events[-1] if files.events else None
    trained = len({r["round"] for r in rows if aggregated_update(r)})
    partial, reasons = completed < planned or trained < planned, []
    if last and last.get("event") == "stopped":
        partial = True
        reasons.append(f"stopped early: {last.get('stopped', 'no reason recorded')}")
    elif completed < planned:
        reasons.append(f"metrics.jsonl ends at round {completed} of {planned} and events.jsonl records no end "
                       "of the run: it crashed, was interrupted, or is still running")
    if partial and trained < completed:
        reasons.append(_untrained_reasons(rows, completed - trained))
    data = (specs.site_data.path or "the packaged MedQuAD excerpt of medical questions and answers") \
        + f" ({describe_fields(specs.task)})"
    split = specs.partition
    partition = {"natural": f"one client per value of '{split.partition_by}'",
                 "dirichlet": f"a skewed split by '{split.partition_by}' (Dirichlet alpha {split.dirichlet_alpha:g})",
                 "iid": "split at random"}.get(split.partition, split.partition)
    sites = {name: records[-1] for name, records in files.view.get("clients", {}).items() if records}
    if sites and all(r.get("deployed") for r in sites.values()):  # what the sites said, not the run config's file
        data = ("each site's own file, which the coordinator never sees (" + ", ".join(
            f"{name}: {r['records']} training records" if r.get("records") else f"{name}: record count not reported"
            for name, r in sorted(sites.items())) + f"; task fields {describe_fields(specs.task)})")
        partition = "none: each site trained on its own records, split into training and held-out by the site"
    return {
        "id": files.run_id, "dir": str(files.path), "scenario": specs.run.scenario,
        "model": MODELS.get(model, model), "model_name": model,
        "task": TASKS.get(specs.task.task, specs.task.task),
        "data": data, "partition": partition,
        "lora": {"r": specs.lora.r, "alpha": specs.lora.alpha, "target_modules": specs.lora.target_modules},
        "aggregation": recorded_aggregation(files),
        "starting_adapter": starting_adapter(files.start), "started_from_public_data": bool(
            files.start and files.start.get("warm_start")),
        "dp_enabled": specs.dp.enabled, "user_dp_enabled": specs.user_dp.enabled,
        "training": {"local_steps": specs.train.local_steps, "batch_size": specs.train.batch_size,
                     "lr": specs.train.lr},
        "dp_asked": {"target_epsilon": specs.dp.target_epsilon, "noise_multiplier": specs.dp.noise_multiplier,
                     "clip_norm": specs.dp.clip_norm},
        "rounds_planned": planned, "rounds_completed": completed, "rounds_trained": trained,
        "rounds_skipped": [r["round"] for r in rows if r.get("skipped")],
        "partial": partial, "partial_reason": "; ".join(reasons) or None,
        "events": files.events, "config": files.config,
    }


def _untrained_reasons(rows: list[dict], idle: int) -> str:
    """Why rounds aggregated no update: the refusals by reason and the failures, over every round."""
    refused = Counter(e.get("reason") or "no reason given" for r in rows for e in r.get("refused", []))
    failed = sum(len(r.get("failed", [])) for r in rows)
    rejected = sum(len(r.get("rejected", [])) for r in rows)
    parts = [f"{n} refused ({why})" for why, n in refused.most_common()]
    parts += [f"{n} failed" for n in [failed] if n] + [f"{n} rejected" for n in [rejected] if n]
    return (f"{idle} round{'s' if idle > 1 else ''} aggregated no client update"
            + (f": site replies {', '.join(parts)}" if parts else ""))


def summary_sentences(run: dict, utility: dict, accounts: dict[str, ClientAccount], idle: list[str],
                      user: UserLevelAccount | None, disagreements: list[str]) -> dict:
    """The one-page summary: {"partial", "what", "guarantees", "check", "how_to_read"}.

    ``idle``: clients that only evaluated (never selected for training in this run).
    """
    trained = run.get("rounds_trained", run["rounds_completed"])
    partial = (f"PARTIAL RUN: only {trained} of {run['rounds_planned']} planned rounds trained"
               + (f" ({run['rounds_completed']} ran)" if run["rounds_completed"] != trained else "")
               + f"; {run['partial_reason']}.") if run["partial"] else None
    records = [a.records for a in accounts.values() if a.records]
    total = f"{sum(records)} training records in all" if len(records) == len(accounts) and records else ""
    held = (f"{len(accounts)} of them trained, on {total or 'their records'}" if idle
            else f"holding {total}" if total else "")
    skipped = run["rounds_skipped"]
    adapters = f"LoRA adapters (rank {run['lora']['r']} on {run['lora']['target_modules'].replace(',', ', ')})"
    what = [
        f"This run fine-tuned {run['model']} with {adapters} for {run['task']}." if trained else
        f"This run trained nothing: no round aggregated a client update, so its model is {run['model']} with its "
        f"initial, untrained {adapters}, meant for {run['task']}.",
        f"The data: {run['data']}, {run['partition']} ({len(accounts) + len(idle)} clients"
        + (f"; {held}" if held else "") + "). The data never left the clients; only adapter updates did.",
        f"{run['rounds_completed']} of {run['rounds_planned']} planned rounds ran, {trained} trained"
        + (f"; round(s) {', '.join(map(str, skipped))} left the model unchanged (too few valid client updates)"
           if skipped else "") + ". " + _utility_sentence(utility),
    ]
    guarantees = [_client_sentence(a) for a in accounts.values()]
    guarantees += [f"Client {name} was not selected for training in this run: its training records were not used "
                   "(nothing spent here)." for name in idle]
    if user is not None:
        guarantees.append(f"In addition, the server protected each WHOLE client's data in the model it released "
                          f"(user-level DP): (ε, δ) = ({user.epsilon:.2f}, {fmt_delta(user.delta)}) over "
                          f"{len(user.rounds)} round(s), under adding or removing one whole client. It covers the "
                          "released models only, not the per-client tables of this report (the coordinator's secret "
                          "material).")
    unverifiable = [a.name for a in accounts.values() if a.dp and not a.recomputable]
    if disagreements:
        check = (f"WARNING: {len(disagreements)} recomputed epsilon(s) disagree with what was reported; see "
                 "'Accounting check'.")
    elif unverifiable:
        check = (f"Every epsilon this run's files allow to recompute agrees with what the clients reported. The totals "
                 f"of {', '.join(unverifiable)} include earlier spend (other runs on the same data) that the clients "
                 "reported and only their own ledgers hold.")
    else:
        check = ("All epsilons were recomputed from the recorded training events and agree with what the clients "
                 "reported.")
    return {"partial": partial, "what": what, "guarantees": guarantees, "check": check, "how_to_read": EPSILON_HELP}


def _utility_sentence(utility: dict) -> str:
    first, last = utility["round0"], utility["final"]
    if first is None or last is None:
        return "No evaluation after training was recorded, so the utility of the trained adapter is unknown."
    change = (last["eval_loss"] / first["eval_loss"] - 1) * 100
    text = (f"On held-out records the clients never trained on, the evaluation loss went from "
            f"{first['eval_loss']:.3f} before training (round 0) to {last['eval_loss']:.3f} after round "
            f"{last['round']} ({change:+.1f}%; lower is better")
    text += f"; perplexity {math.exp(first['eval_loss']):.1f} → {math.exp(last['eval_loss']):.1f})" \
        if last["eval_loss"] < 50 else ")"
    for key in ("accuracy", "top1_accuracy"):
        if key in first and key in last:
            text += f"; {key.replace('_', ' ')} {first[key]:.1%} → {last[key]:.1%}"
    return text + "."


def _client_sentence(a: ClientAccount) -> str:
    records = f" ({a.records} records)" if a.records else ""
    if not a.dp:
        return f"Client {a.name}{records} trained WITHOUT differential privacy: its records have no formal protection."
    if math.isnan(a.epsilon):
        return f"Client {a.name}: its privacy records could not be read, so no guarantee can be stated."
    if a.unit_level:
        held = f" ({a.units} {a.unit}s, {a.records} records)" if a.units else records
        text = (f"Each {a.unit} of client {a.name}{held}, with all of their records (at most {a.records_per_unit} "
                f"of them in any one step), is protected with (ε, δ) = ({a.epsilon:.2f}, {fmt_delta(a.delta)}) over "
                f"all training on these records so far, under adding or removing one {a.unit} (the {a.unit} count "
                "is sent in clear, so it is not hidden)")
        one = a.unit
    else:
        text = (f"Each record of client {a.name}{records} is protected with (ε, δ) = "
                f"({a.epsilon:.2f}, {fmt_delta(a.delta)}) over all training on these records so far, under adding or "
                "removing one record (its record count is sent in clear, so it is not hidden)")
        one = "record"
    if a.epsilon_replace_one is not None and math.isfinite(a.epsilon_replace_one):
        text += f"; under replacing one {one} by another, ε = {a.epsilon_replace_one:.2f} at the same δ"
    if a.epsilon_group is not None:
        text += (f"; a person with {a.group_records} records (the most any one holds here) is protected only with "
                 f"ε = {a.epsilon_group:.2f} at the same δ (group privacy, computed; protect people directly with "
                 "a privacy unit)")
    if not a.recomputable:
        text += (f" (this run: ε = {a.epsilon_run:.2f}; the total includes earlier spend that the client "
                 "reported and only its own ledger holds)")
    elif a.epsilon_before > 0:
        text += f" (this run: ε = {a.epsilon_run:.2f}; before it: {a.epsilon_before:.2f})"
    if a.budget is not None:
        text += f"; {fmt_budget(a.budget, a.remaining)}"
    if a.refused:
        rounds = ", ".join(str(r["round"]) for r in a.refused)
        text += f". It refused round(s) {rounds}: {a.refused[-1]['reason']}"
    return text + "."


def protection_notes(*, seeds: set | None, aggregation: str | None, user: UserLevelAccount | None,
                     generators: set | None = None, units: set | None = None,
                     server_noise_seed: int | None = None, dp_enabled: bool = True,
                     train_metrics_in_clear: bool = False) -> list[dict]:
    """What is and is not protected, as {"topic", "text"} items.

    ``seeds`` / ``generators``: the noise_seed / noise_generator fields of the privacy
    records (None: a client ledger, which does not record them; a record without
    noise_generator was written before fedslm drew its noise from ChaCha20); ``aggregation``: None
    when unknown (a client's own view);
    ``train_metrics_in_clear``: the run's files hold train losses or training times the
    clients sent (older versions did; under DP they no longer send them).
    """
    update = ("its LoRA B factors; A is fixed by the shared seed, FFA-LoRA" if aggregation == "ffa"
              else "its LoRA adapter factors")
    people = sorted((units or set()) - {"record"})
    notes = [
        {"topic": "Unit of privacy",
         "text": ("One training record (one example, e.g. one question-answer pair) of one client. A person with k "
                  "records in a client's data is protected far more weakly (group privacy: the report computes it "
                  "where a client names whose records are whose)." if not people else
                  f"Clients that name a privacy unit ({', '.join(people)}) protect each such unit with ALL of its "
                  "records: DP-SGD samples units (Poisson, rate q over units), averages each sampled unit's "
                  "gradients over at most k of its records and clips that mean as one, so adding or removing a "
                  "whole unit is what their ε bounds (unit-level DP, Charles et al. 2025; Chua et al. 2024)"
                  + ("; the other clients protect each record." if "record" in (units or set()) else "."))},
        {"topic": "Neighbouring relation",
         "text": f"Every sample-level guarantee in this report is {STATEMENT}. It bounds what anyone can tell "
                 "about one record being in the training data or not; it does not hide how many records there "
                 "are. The replace-one ε (one record swapped for another, the count unchanged) is shown next to "
                 "it wherever this run's files hold all the events; it is the larger number."},
        {"topic": "Sample-level DP (on each client)",
         "text": "Each client trains with DP-SGD (Opacus): every example's gradient is clipped to the clip norm C "
                 "(its norm taken in fp32, also under bf16 autocast) and Gaussian noise of standard deviation "
                 "sigma·C is added to each step. Epsilon composes every step of every round and run the client "
                 "took part in (PRV accountant; RDP as a cross-check)."},
        {"topic": "User-level DP (on the server)",
         "text": ("ON: the server clips each client's whole update, samples clients at random (Poisson) and adds "
                  "noise to their mean (DP-FedAvg), so the released adapter also protects each whole client "
                  "(adding or removing one client). It protects what the server releases, not what the server "
                  "sees, and is weak when few clients take part in every round. " + PER_CLIENT_SECRET) if user else
                 "OFF: a whole client's data set is not protected as a unit; only each record is (sample-level)."},
        {"topic": "Poisson sampling",
         "text": "Each DP-SGD step includes every record independently with probability q (the sample rate). This "
                 "is what the accountant assumes; shuffled fixed-size batches would make the stated epsilon "
                 "invalid (Chua et al. 2024), and fedslm never uses them under DP."},
        {"topic": "No amplification from client selection",
         "text": "When the server picks only some clients for a round, no privacy gain is claimed for it: a client "
                 "knows when it was picked, so its epsilon counts every round it actually trained in."},
        _randomness_note(seeds, generators),
        {"topic": "What the server sees, covered by DP",
         "text": f"Each client's adapter update ({update}), in clear: there is no secure aggregation. The update is "
                 "the output of DP-SGD, so it is covered by the client's sample-level guarantee."},
        {"topic": "Not protected: the record count",
         "text": "Each client sends the number of its training records in clear (the server weights the average "
                 "by it). Add/remove-one DP does not hide it, and nothing else does."},
        {"topic": "Not protected: participation",
         "text": "Which clients are connected, selected, refuse (budget exhausted) or reply in each round is seen by "
                 "the server and written to the run's files and this report, as is each client's privacy record "
                 "(sigma, sample rate, steps, delta, epsilon)."},
        {"topic": "Not protected: held-out evaluation records",
         "text": "Evaluation loss and accuracy are computed on each client's held-out records, which are never "
                 "trained on. A simulated client's metrics (and a deployed site's with evaluate = non-sensitive, "
                 "on a file it declared non-sensitive) are NOT protected by DP: they leave the client in clear for "
                 "any adapter the coordinator sends to evaluate, and are written to this report. The client pins "
                 "which of its records are held out; anything about them that these metrics reveal is not covered. "
                 "A deployed site answers no evaluation by default; with evaluate = dp its metrics carry Gaussian "
                 "noise charged to its ledger (its privacy records with mechanism dp-evaluation)."},
        {"topic": "Not protected: settings chosen from the data",
         "text": "A simulation fits the window (model.max-length 0: the 95th-percentile example's length), whether a "
                 "label prompt lists the labels, and a label task's candidate words to the whole data file before "
                 "the first round (config.json records the values). These choices read the records without noise "
                 "and are not covered by any guarantee here. A deployed site makes none of them from its records: "
                 "its candidate words are approved in its node config, and a window of 0 is its cap."},
        {"topic": "Not protected: the model architecture",
         "text": "The base model, the LoRA configuration and the shapes of every update are known to the server and "
                 "to every client."},
        {"topic": "Not protected: timing",
         "text": "When each client replies, and how long its rounds take, is visible to the server (and to anyone "
                 "watching the network), and can depend on the client's data (its record count, the lengths of its "
                 "records, the Poisson batch sizes)."},
        {"topic": "Not protected: a compromised site",
         "text": "The guarantee assumes each client runs fedslm's code as shipped. If a site's own code, machine or "
                 "ledger is compromised, nothing about its records is protected."},
    ]
    if train_metrics_in_clear:
        notes.append({"topic": "Not protected: training metrics in this run's files",
                      "text": "This run's metrics hold train losses or training times that clients sent. They are "
                              "computed on the training records without noise, so they are NOT covered by the "
                              "sample-level guarantee (fedslm no longer sends them from DP clients)."})
    if not dp_enabled:
        notes.insert(0, {"topic": "Sample-level DP is OFF in this run",
                         "text": "The clients trained without DP-SGD: their updates carry no privacy guarantee, and "
                                 "the notes below on sample-level DP do not apply to this run."})
    if user is not None and server_noise_seed is not None:
        notes.append({"topic": "Server noise seed",
                      "text": "The server's user-level noise is seeded from OS entropy." if server_noise_seed < 0 else
                              f"The server's user-level noise used a FIXED seed ({server_noise_seed}): anyone who "
                              "knows it and the clean mean can remove the noise. Not private against them."})
    return notes


CSPRNG = "chacha20"  # the noise_generator field of a privacy record (client.app)
CHACHA = "keyed afresh for every round with 256 bits of OS entropy, so the key cannot be guessed"
MT_ENTROPY = "whose whole 624-word state was derived for every round from 256 bits of OS entropy"


def _randomness_note(seeds: set | None, generators: set | None) -> dict:
    if generators is None or generators == {CSPRNG}:
        return {"topic": "Randomness: a cryptographic generator (ChaCha20)",
                "text": "Every noise draw and every Poisson sampling decision comes from a ChaCha20 keystream (RFC "
                        "8439, privacy/mechanism/randomness.py) " + _seed_text(seeds, CHACHA) + " Seeing released "
                        "noise tells nothing about the noise of other coordinates or steps. The Gaussian noise is "
                        "drawn by the Box-Muller transform in float64. Not mitigated: floating-point attacks on "
                        "continuous Gaussian samplers (Mironov, CCS 2012; Jin et al., IEEE S&P 2022)."}
    return {"topic": "Randomness: not a cryptographic generator in some rounds",
            "text": "In rounds whose privacy records carry no noise_generator field (fedslm before it drew from "
                    "ChaCha20), the noise and the Poisson sampling came from torch's Mersenne Twister, "
                    + _seed_text(seeds, MT_ENTROPY) + " The Mersenne Twister is linear: from enough released "
                    "values that are pure noise its state, and so the noise of the whole round, can be "
                    "reconstructed. Those rounds' guarantee holds only against a coordinator that did not "
                    "make such releases."}


def _seed_text(seeds: set | None, source: str) -> str:
    if seeds is None:
        return (f"{source}, by default; from a fixed seed when dp.noise-seed >= 0. The ledger does not record "
                "which (the server's privacy/ledger.json does, as noise_seed).")
    if any(str(seed).startswith("fixed") for seed in seeds):
        return ("seeded from a FIXED seed (dp.noise-seed >= 0) in at least one round: anyone who knows the seed can "
                "regenerate and subtract the noise, so there is no guarantee against them.")
    if seeds == {"os-entropy"}:
        return f"{source}."
    return (f"{source}, by default; from a fixed seed when dp.noise-seed >= 0. These privacy records carry no "
            "noise_seed field (written before fedslm recorded it), so which one was used cannot be confirmed from "
            "the files.")


def recorded_aggregation(files: RunFiles) -> str | None:
    """The aggregation as the run recorded it: the server writes the one it used (never "auto") into config.json.

    A run written before that recorded "auto": it is shown as such, with the rule of that
    time, rather than re-derived by today's code (whose rule may since have changed).
    """
    if "server.aggregation" not in files.recorded:
        return None
    name = files.specs.server.aggregation
    return name if name != "auto" else "auto (recorded as asked: ffa under DP, fedavg otherwise when it ran)"


def starting_adapter(record: dict | None) -> str:
    """In words: where the run's starting adapter came from (server.initial_adapter records it; console and report)."""
    if not record:
        return "the shared seed's (lora.seed): B = 0, so round 0 is the base model"
    warm = record.get("warm_start")
    source = f"read from {record['directory']} (sha256 {record['adapter_sha256'][:16]})"
    if not warm:
        return source
    after, before = warm.get("held_out_after", {}), warm.get("held_out_before", {})
    gain = (f"; on its held-out records loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
            if "eval_loss" in after and "eval_loss" in before and all(map(math.isfinite, (
                before["eval_loss"], after["eval_loss"]))) else "")
    return (f"{source}, trained by the coordinator on public file {warm['file']} (sha256 {warm['file_sha256'][:16]}, "
            f"{warm['train_records']} records) for {warm['steps']} steps without DP ({warm['trained']}){gain}")


def starting_adapter_note(record: dict) -> dict:
    """The protection note of a run that started from an adapter other than the shared seed's."""
    text = f"The first round started from an adapter {starting_adapter(record)}."
    if record.get("warm_start"):
        text += (" That training read no site's records and spent no site's budget; the sites' guarantees hold "
                 "for any starting adapter chosen without their data. fedslm cannot check that the file is "
                 "public: had it held a site's records, those records would have been trained on without any "
                 "protection.")
    else:
        text += (" If that adapter was trained on the sites' records (another run's), those records' spend is in "
                 "that run's ledgers, which each site's own ledger composes across runs.")
    return {"topic": "Starting adapter", "text": text}
