"""The server's round loop over Flower's Grid.

We drive the Grid directly instead of ``FedAvg.start`` because a privacy-aware server
needs more than a strategy hook offers: a round-0 federated evaluation, per-client
progress lines, the clients' privacy records kept per round, clients that refused
("budget exhausted") left out of later sampling, validation of every reply, optional
user-level DP, a checkpoint after every round, and a run that stops cleanly (keeping its
outputs) when too few clients remain.

Client selection. Without user-level DP a seeded ``random.Random(server.seed)`` picks
ceil(fraction-train * N) clients, ordered by the names they report (not by Flower's node
ids, which change with every simulation), so a resumed run picks the same ones; no
privacy is claimed from that selection, so its predictability costs nothing. With
user-level DP the cohort is Poisson-sampled from OS entropy (server.user_dp): the
user-level epsilon assumes that nobody can tell whether a client was in a round, so
metrics.jsonl and the console then give the cohort's size, never who was in it.

Release order under user-level DP: the noise is drawn and the round's event counted,
the checkpoint is written, and only then is anything of the round released (the adapter
on disk, evaluation messages carrying it, metrics). A run stopped in between resumes with
that event still counted and trains the round again with a fresh cohort and fresh noise:
both releases are composed (metrics.jsonl keeps the interrupted one as a row marked
"interrupted").
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import replace

from flwr.app import ConfigRecord, Message, RecordDict

from privacy.report.run_files import aggregated_update
from server import checkpoint
from server.aggregate import aggregate
from server.checkpoint import ServerState
from server.console import first_problem, say, trained_line
from server.evaluation import describe, evaluation_name, evaluation_sample, summarize
from server.exchange import send_and_receive
from server.intake import Names, check_secure_training, check_training
from server.privacy_view import PrivacyView
from server.round_spec import RoundSpec
from server.rundir import RunDir
from server.secure_aggregation import max_weight, secure_mean
from server.ship import parse_quants, plan_shipments, round0_eval_loss, ship_messages, shipping_warning
from server.user_dp import UserDpSpec, poisson_cohort, private_round, server_random
from server.validate import Rejected, validate_update
from slm.lora import LoraSpec, a_factor_digest, save_adapter, sent_tensors, through_wire, to_arrays


class Federation:
    """One run: the Grid, the config, the run directory and the evolving server state."""

    def __init__(self, grid, config: dict, rundir: RunDir, state: ServerState, base_model_path: str):
        self.grid, self.config, self.rundir, self.state = grid, config, rundir, state
        self.spec = RoundSpec.from_config(config)
        self.lora = LoraSpec.from_config(config)
        self.base_model_path = base_model_path
        self.view = PrivacyView.from_dict(state.privacy_view)
        self.committed_view = copy.deepcopy(state.privacy_view)  # the view as of the last completed round
        self.names = Names()
        self.user_dp: UserDpSpec | None = None
        self.dp_random = None  # user-level cohorts and noise: keyed once per process (user_dp_random), never saved
        self.last_trained, self.last_eval = 0, {}
        self.base_cfg = {"num-rounds": self.spec.rounds, "run-id": rundir.path.name, "run-dir": str(rundir.path),
                         "aggregation": self.spec.aggregation,
                         "lora-a-sha256": a_factor_digest(state.adapter)}

    # ---- messaging -----------------------------------------------------------------
    def _send(self, node_ids, message_type: str, server_round: int) -> list[Message]:
        sent = sent_tensors(self.state.adapter, self.spec.aggregation)
        content = RecordDict({"arrays": to_arrays(sent, self.config["server.wire-dtype"]),
                              "config": ConfigRecord({**self.base_cfg, "server-round": server_round})})
        messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in node_ids]
        return send_and_receive(self.grid, messages, timeout=self.spec.timeout, what=f"round {server_round} "
                                f"{'training' if message_type == 'train' else 'evaluation'}", say=say)

    # ---- evaluation ----------------------------------------------------------------
    def evaluate(self, server_round: int, nodes, replies=None, label: str = "eval") -> dict:
        """Token-weighted federated eval loss (and accuracies) over the clients' held-out splits."""
        if replies is None:
            replies = self._send(nodes, "evaluate", server_round)
        summary = summarize(self.names.take_in(replies, evaluation_name), self.names)
        for line in describe(summary, label):
            say(f"round {server_round}: {line}")
        return summary

    # ---- shipping ------------------------------------------------------------------
    def ship(self, server_round: int, nodes, fp32: dict) -> None:
        """Export this round's files (server.ship: ship.kind), ship each to every client, record their evaluations."""
        shipments = plan_shipments(self.rundir.path, self.config, server_round,
                                   eval_metrics={"eval_loss": fp32.get("eval_loss")})
        results = {"fp32": {k: fp32[k] for k in ("eval_loss", "eval_clients", "accuracy") if k in fp32}}
        untrained = round0_eval_loss(self.rundir.path)
        for shipment in shipments:
            messages = ship_messages(shipment, nodes, {**self.base_cfg, "server-round": server_round})
            replies = send_and_receive(self.grid, messages, timeout=self.spec.timeout,
                                       what=f"round {server_round} shipping {shipment.label}", say=say)
            summary = self.evaluate(server_round, nodes, replies=replies, label=f"shipped {shipment.label} eval")
            results[shipment.label] = {**summary, **shipment.record()}
            warning = shipping_warning(shipment, summary.get("eval_loss"), untrained)
            if warning:
                say(f"round {server_round}: WARNING shipped {warning}")
        self.rundir.append_metrics({"round": server_round, "shipped": results})

    # ---- training ------------------------------------------------------------------
    def user_dp_random(self):
        """This process's user-level cohorts and noise: keyed once, from the rounds counted when it starts."""
        if self.dp_random is None:
            self.dp_random = server_random(self.config["server.noise-seed"], len(self.state.user_dp_events))
        return self.dp_random

    def sample(self, available: list[int]) -> list[int]:
        ordered = sorted(available, key=lambda n: (self.names(n), n))
        if self.user_dp is not None:  # Poisson over clients from OS entropy: what the user-level accountant assumes
            return poisson_cohort(ordered, self.user_dp.sample_rate, self.user_dp_random())
        # Seeded and replayed on resume: no amplification is claimed from this selection.
        k = max(self.spec.min_clients, math.ceil(self.spec.fraction_train * len(ordered)))
        return sorted(self.state.sampling.sample(ordered, min(k, len(ordered))))

    def train(self, server_round: int, sampled: list[int], eligible: int) -> tuple[dict | None, dict]:
        """Send the adapter to the sampled clients; return (new sent tensors or None, metrics row).

        Under user-level DP the row and the console name nobody of the sample (who was in
        it is what the amplification hides): the cohort's size, and refusals, failures and
        rejections by reason only. Duplicate site names are the exception: that rejection
        depends on configuration only, never on a site's data, and the operator must see it.
        """
        wire, private = self.config["server.wire-dtype"], self.user_dp is not None
        sent = through_wire(sent_tensors(self.state.adapter, self.spec.aggregation), wire)  # what clients get
        row = {"sampled": len(sampled), "participants": [], "refused": [], "failed": [], "rejected": []}
        if self.spec.secure:
            return self._train_securely(server_round, sampled, sent, row)
        intake = self.names.take_in(self._send(sampled, "train", server_round), _train_name, sampled, self.spec.timeout)
        replies = check_training(intake.usable, sent, self.spec.max_update_norm,
                                 lambda name, privacy: self.view.record(server_round, name, privacy))
        self._note_problems(server_round, row, intake, replies, private)
        states = [u.state for u in replies.updates]
        row["bytes_up"] = sum(to_arrays(s, wire).count_bytes() for s in states)
        row["bytes_down"] = to_arrays(sent, wire).count_bytes() * len(sampled)
        if private:  # the cohort's size only; even its mean train loss would be an un-noised statistic of it
            del row["participants"]
            row["cohort"] = len(states)
            new, row["user_dp"] = private_round(server_round, states, sent, self.user_dp, eligible,
                                                self.user_dp_random(), self.state.user_dp_events)
            self.view.user_level.append(row["user_dp"])
            return new, row
        for u in replies.updates:
            say(f"round {server_round}: {u.name} {trained_line(u.metrics, u.privacy)}")
            row["participants"].append({"client": u.name, "update_norm": u.norm, **u.metrics})
        if len(states) < self.spec.min_clients:
            say(f"round {server_round}: {len(states)} valid replies < min-clients {self.spec.min_clients}; "
                "round skipped")
            row["skipped"] = True
            return None, row
        losses = [(u.metrics["train_loss"], u.metrics["num-examples"]) for u in replies.updates
                  if u.metrics.get("train_loss") is not None]  # DP replies carry none
        if losses:
            row["train_loss"] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        return aggregate(self.spec.aggregation, states, [u.metrics["num-examples"] for u in replies.updates]), row

    def _note_problems(self, server_round: int, row: dict, intake, replies, private: bool) -> None:
        """Failures, duplicate names, refusals and rejections of a round, into its row and onto the console.

        One loop for the clear and the secure path. Under user-level DP (``private``) a site is
        named only for a duplicate name, which depends on configuration, never on its data.
        """
        for what, named, entries in (
                ("failed", not private, [(self.names(node), why) for node, why in intake.failed]),
                ("rejected", True, [(name, why) for _, name, why in intake.duplicate]),
                ("refused", not private, replies.refused), ("rejected", not private, replies.rejected)):
            for name, why in entries:
                row[what].append({"client": name, "reason": why} if named else {"reason": why})
                say(f"round {server_round}: {name if named else 'a sampled client'} {what}: {why}")

    def _train_securely(self, server_round: int, sampled: list[int], sent: dict, row: dict) -> tuple[dict | None, dict]:
        """One round through Flower's SecAgg+: the server learns the sum, the participation, the clear
        metrics and privacy records, never one site's B (its checks moved to the sites)."""
        request = RecordDict({"arrays": to_arrays(sent, self.config["server.wire-dtype"]),
                              "config": ConfigRecord({**self.base_cfg, "server-round": server_round})})
        cap = max_weight([int(r["records"]) for entries in self.view.clients.values() for r in entries
                          if r.get("records")])
        result = secure_mean(self.grid, sampled, request, sent, cap, server_round, self.spec.timeout)
        intake = self.names.take_in(result.replies, _train_name, sampled, self.spec.timeout)
        replies = check_secure_training(intake.usable, lambda name, privacy: self.view.record(server_round, name,
                                                                                                privacy))
        self._note_problems(server_round, row, intake, replies, private=False)
        for u in replies.updates:
            say(f"round {server_round}: {u.name} {trained_line(u.metrics, u.privacy)}")
            row["participants"].append({"client": u.name, **u.metrics})
        row["bytes_up"], row["bytes_down"] = result.bytes_up, result.bytes_down
        row["secure_aggregation"] = {"sampled": len(sampled), "in_sum": len(replies.updates),
                                     "threshold": result.threshold, "max_weight": cap, "messages": result.messages}
        why = None
        if result.mean is None:
            why = f"secure aggregation halted (fewer than {result.threshold} of {len(sampled)} sites stayed)"
        elif intake.duplicate:
            why = "duplicate site names in a secure round (a masked sum cannot leave one out)"
        elif len(replies.updates) < self.spec.min_clients:
            why = f"{len(replies.updates)} updates in the secure sum < min-clients {self.spec.min_clients}"
        else:
            try:
                validate_update(result.mean, sent, self.spec.max_update_norm)
            except Rejected as err:
                why = f"the secure sum is invalid ({err})"
        if why is not None:
            say(f"round {server_round}: {why}; round skipped")
            row["skipped"] = True
            return None, row
        say(f"round {server_round}: securely aggregated {len(replies.updates)} updates (SecAgg+, threshold "
            f"{result.threshold} of {len(sampled)}): the server saw only their sum")
        return result.mean, row

    # ---- the run -------------------------------------------------------------------
    def run(self, resumed: bool) -> dict:
        nodes = _wait_for_nodes(self.grid, self.spec.min_clients, self.spec.timeout)
        if len(nodes) < self.spec.min_clients:
            say(f"only {len(nodes)} clients connected, fewer than min-clients {self.spec.min_clients}; stopping")
            return {"stopped": "too few clients", "rounds_completed": self.state.round,
                    "rounds_trained": self._rounds_trained()}
        self.user_dp = UserDpSpec.from_config(self.config, len(nodes))
        say(f"run directory {self.rundir.path}  ({len(nodes)} clients, {self.spec.rounds} rounds, "
            f"aggregation {self.spec.aggregation}{', user-level DP' if self.user_dp else ''})")
        nodes = evaluation_sample(nodes, self.config["server.fraction-evaluate"], self.config["server.seed"])
        started = time.time()
        if resumed:
            say(f"resuming after round {self.state.round}")
            self.rundir.log_event({"event": "resumed", "after_round": self.state.round})
            self._count_interrupted()
            self.evaluate(self.state.round, nodes)  # also learns the clients' names for ordered sampling
        else:
            save_adapter(self.state.adapter, self.lora, self.base_model_path, self.rundir.adapter_dir(0))
            first = self.evaluate(0, nodes)
            self.rundir.append_metrics({"round": 0, **first, "seconds": time.time() - started})
            self._checkpoint()
        outcome = {}
        for server_round in range(self.state.round + 1, self.spec.rounds + 1):
            t0 = time.time()
            available = [n for n in sorted(self.grid.get_node_ids())
                         if self.names(n) not in self.view.exhausted and not self.names.is_ambiguous(n)]
            if len(available) < self.spec.min_clients:
                outcome = {"stopped": f"only {len(available)} clients still have budget "
                                      f"(min-clients {self.spec.min_clients})"}
                say(f"round {server_round}: {outcome['stopped']}; stopping cleanly")
                break
            new, row = self.train(server_round, self.sample(available), len(available))
            if not aggregated_update(row):
                say(f"round {server_round}: no usable update: {first_problem(row)}")
            if "user_dp" in row:  # counted and on disk before anything of the round leaves
                self._checkpoint_pending()
                record = row["user_dp"]
                say(f"round {server_round}: user-level DP over {row['cohort']} clients (expected "
                    f"{record['sample_rate'] * record['eligible']:.1f}), user-level eps {record['epsilon']:.3f} "
                    f"at delta {record['delta']:.2g}")
            if new is not None:
                self.state.adapter = {**self.state.adapter, **new}
                save_adapter(self.state.adapter, self.lora, self.base_model_path,
                             self.rundir.adapter_dir(server_round))
                row.update(self.evaluate(server_round, nodes))
                self.last_trained, self.last_eval = server_round, row
            self.state.round = server_round
            self.rundir.write_privacy_view(self.view.to_dict())
            self.rundir.append_metrics({"round": server_round, **row, "seconds": time.time() - t0})
            every = self.config["ship.every"]
            if new is not None and every and server_round % every == 0 and server_round < self.spec.rounds:
                self._ship(server_round, nodes, row)
            self._checkpoint()
        if self.last_trained:
            self._ship(self.last_trained, nodes, self.last_eval)
        completed = self.state.round
        self.rundir.log_event({"event": "stopped" if outcome else "finished", "rounds": completed, **outcome})
        return {**outcome, "rounds_completed": completed, "rounds_trained": self._rounds_trained()}

    def _rounds_trained(self) -> int:
        """Rounds (earlier processes' included, on resume) in which at least one client's update was aggregated."""
        path = self.rundir.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return len({row["round"] for row in rows if aggregated_update(row)})

    def _ship(self, server_round: int, nodes, fp32: dict) -> None:
        if parse_quants(self.config["ship.quantizations"]):
            self.ship(server_round, nodes, fp32)

    def _checkpoint(self) -> None:
        """After a completed round: everything, the round's release included."""
        self.state.privacy_view = self.view.to_dict()
        checkpoint.save(self.rundir.path, self.state)
        self.committed_view = copy.deepcopy(self.state.privacy_view)

    def _checkpoint_pending(self) -> None:
        """After a round's user-level noise is drawn, before its release: the last round's state, this event counted.

        Resuming from it trains the round again from the previous adapter; the event and
        the user-level record stay (the first draw may have been released). The clients'
        records of the unfinished round are left out as in any interrupted round: their
        own ledgers keep those reservations.
        """
        view = {**self.committed_view, "user_level": copy.deepcopy(self.view.user_level)}
        checkpoint.save(self.rundir.path, replace(self.state, privacy_view=view))

    def _count_interrupted(self) -> None:
        """On resume: user-level releases drawn after the checkpoint's round stay counted, in metrics.jsonl too.

        privacy.report recomputes the user-level epsilon from metrics.jsonl's rows, so each
        interrupted draw gets a row of its own (after the rows kept up to the checkpoint).
        """
        for record in self.view.user_level:
            if record["round"] > self.state.round:
                record["interrupted"] = True
                self.rundir.append_metrics({"round": record["round"], "interrupted": True, "user_dp": record})
                say(f"round {record['round']} was interrupted after its user-level noise was drawn: that release "
                    f"stays counted (user-level eps {record['epsilon']:.3f}); the round is trained again with a "
                    "fresh cohort and fresh noise")


def initial_state(adapter: dict, config: dict) -> ServerState:
    """Round 0. ``sampling`` serves the seeded selection without user-level DP only."""
    return ServerState(round=0, adapter=adapter, sampling=random.Random(config["server.seed"]))


def _train_name(reply) -> str | None:
    return str(reply.content["privacy"]["client"]) if "client" in reply.content.get("privacy", {}) else None


def _wait_for_nodes(grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1.0)
    return nodes

