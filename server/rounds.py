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

from fedslm.common.vocabulary import RunConfig
from privacy.report.run_files import aggregated_update
from server import checkpoint
from server.aggregate import aggregate
from server.checkpoint import ServerState
from server.console import first_problem, say, trained_line
from server.evaluation import describe, evaluation_name, evaluation_sample, summarize
from server.exchange import send_and_receive
from server.intake import Names, check_secure_training, check_training
from server.outcome import RoundOutcome
from server.privacy_view import PrivacyView
from server.round_spec import RoundSpec
from server.rundir import RunDir
from server.secure_aggregation import max_weight, secure_mean
from server.shipping import ShippingStep
from server.user_dp import UserDpSpec, UserLevelStep
from server.validate import Rejected, validate_update
from slm.lora import LoraSpec, a_factor_digest, save_adapter, sent_tensors, through_wire, to_arrays


class Federation:
    """One run: the Grid, the run's typed specs, the run directory and the evolving server state."""

    def __init__(self, grid, specs: RunConfig, rundir: RunDir, state: ServerState, base_model_path: str):
        self.grid, self.specs, self.rundir, self.state = grid, specs, rundir, state
        self.spec = RoundSpec.of(specs)
        self.lora = LoraSpec.of(specs.lora)
        self.base_model_path = base_model_path
        self.view = PrivacyView.from_dict(state.privacy_view)
        self.committed_view = copy.deepcopy(state.privacy_view)  # the view as of the last completed round
        self.names = Names()
        self.user_level: UserLevelStep | None = None  # user-level DP, once the clients are counted (run)
        self.base_cfg = {"num-rounds": self.spec.rounds, "run-id": rundir.path.name, "run-dir": str(rundir.path),
                         "aggregation": self.spec.aggregation,
                         "lora-a-sha256": a_factor_digest(state.adapter)}
        self.shipping = ShippingStep(grid, specs, rundir, self.base_cfg, self.spec.timeout, self.evaluate)

    # ---- messaging -----------------------------------------------------------------
    def _send(self, node_ids, message_type: str, server_round: int) -> list[Message]:
        sent = sent_tensors(self.state.adapter, self.spec.aggregation)
        content = RecordDict({"arrays": to_arrays(sent, self.specs.server.wire_dtype),
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

    # ---- training ------------------------------------------------------------------
    def sample(self, available: list[int]) -> list[int]:
        ordered = sorted(available, key=lambda n: (self.names(n), n))
        if self.user_level is not None:  # Poisson over clients from OS entropy: what the user-level accountant assumes
            return self.user_level.sample(ordered)
        # Seeded and replayed on resume: no amplification is claimed from this selection.
        k = max(self.spec.min_clients, math.ceil(self.spec.fraction_train * len(ordered)))
        return sorted(self.state.sampling.sample(ordered, min(k, len(ordered))))

    def train(self, server_round: int, sampled: list[int], eligible: int) -> RoundOutcome:
        """Send the adapter to the sampled clients, take in their replies, aggregate: the round's outcome.

        Under user-level DP the outcome and the console name nobody of the sample (who was in
        it is what the amplification hides): the cohort's size, and refusals, failures and
        rejections by reason only. Duplicate site names are the exception: that rejection
        depends on configuration only, never on a site's data, and the operator must see it.
        """
        wire, private = self.specs.server.wire_dtype, self.user_level is not None
        sent = through_wire(sent_tensors(self.state.adapter, self.spec.aggregation), wire)  # what clients get
        outcome = RoundOutcome(sampled=len(sampled))
        if self.spec.secure:
            return self._train_securely(server_round, sampled, sent, outcome)
        intake = self.names.take_in(self._send(sampled, "train", server_round), _train_name, sampled, self.spec.timeout)
        replies = check_training(intake.usable, sent, self.spec.max_update_norm,
                                 lambda name, privacy: self.view.record(server_round, name, privacy))
        self._note_problems(server_round, outcome, intake, replies, private)
        states = [u.state for u in replies.updates]
        outcome.bytes_up = sum(to_arrays(s, wire).count_bytes() for s in states)
        outcome.bytes_down = to_arrays(sent, wire).count_bytes() * len(sampled)
        if private:  # the cohort's size only; even its mean train loss would be an un-noised statistic of it
            self.user_level.release(server_round, outcome, states, sent, eligible)
            return outcome
        for u in replies.updates:
            say(f"round {server_round}: {u.name} {trained_line(u.metrics, u.privacy)}")
            outcome.participants.append({"client": u.name, "update_norm": u.norm, **u.metrics})
        if len(states) < self.spec.min_clients:
            say(f"round {server_round}: {len(states)} valid replies < min-clients {self.spec.min_clients}; "
                "round skipped")
            return outcome.skip()
        losses = [(u.metrics["train_loss"], u.metrics["num-examples"]) for u in replies.updates
                  if u.metrics.get("train_loss") is not None]  # DP replies carry none
        if losses:
            outcome.train_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        outcome.update = aggregate(self.spec.aggregation, states, [u.metrics["num-examples"] for u in replies.updates])
        return outcome

    def _note_problems(self, server_round: int, outcome: RoundOutcome, intake, replies, private: bool) -> None:
        """Failures, duplicate names, refusals and rejections of a round, into its outcome and onto the console.

        One loop for the clear and the secure path. Under user-level DP (``private``) a site is
        named only for a duplicate name, which depends on configuration, never on its data.
        """
        for what, named, entries in (
                ("failed", not private, [(self.names(node), why) for node, why in intake.failed]),
                ("rejected", True, [(name, why) for _, name, why in intake.duplicate]),
                ("refused", not private, replies.refused), ("rejected", not private, replies.rejected)):
            for name, why in entries:
                getattr(outcome, what).append({"client": name, "reason": why} if named else {"reason": why})
                say(f"round {server_round}: {name if named else 'a sampled client'} {what}: {why}")

    def _train_securely(self, server_round: int, sampled: list[int], sent: dict,
                        outcome: RoundOutcome) -> RoundOutcome:
        """One round through Flower's SecAgg+: the server learns the sum, the participation, the clear
        metrics and privacy records, never one site's B (its checks moved to the sites)."""
        request = RecordDict({"arrays": to_arrays(sent, self.specs.server.wire_dtype),
                              "config": ConfigRecord({**self.base_cfg, "server-round": server_round})})
        cap = max_weight([int(r["records"]) for entries in self.view.clients.values() for r in entries
                          if r.get("records")])
        result = secure_mean(self.grid, sampled, request, sent, cap, server_round, self.spec.timeout)
        intake = self.names.take_in(result.replies, _train_name, sampled, self.spec.timeout)
        replies = check_secure_training(intake.usable, lambda name, privacy: self.view.record(server_round, name,
                                                                                                privacy))
        self._note_problems(server_round, outcome, intake, replies, private=False)
        for u in replies.updates:
            say(f"round {server_round}: {u.name} {trained_line(u.metrics, u.privacy)}")
            outcome.participants.append({"client": u.name, **u.metrics})
        outcome.bytes_up, outcome.bytes_down = result.bytes_up, result.bytes_down
        outcome.secure_aggregation = {"sampled": len(sampled), "in_sum": len(replies.updates),
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
            return outcome.skip()
        say(f"round {server_round}: securely aggregated {len(replies.updates)} updates (SecAgg+, threshold "
            f"{result.threshold} of {len(sampled)}): the server saw only their sum")
        outcome.update = result.mean
        return outcome

    # ---- the run -------------------------------------------------------------------
    def run(self, resumed: bool) -> dict:
        nodes = _wait_for_nodes(self.grid, self.spec.min_clients, self.spec.timeout)
        if len(nodes) < self.spec.min_clients:
            say(f"only {len(nodes)} clients connected, fewer than min-clients {self.spec.min_clients}; stopping")
            return {"stopped": "too few clients", "rounds_completed": self.state.round,
                    "rounds_trained": self._rounds_trained()}
        user_dp = UserDpSpec.of(self.specs, len(nodes))
        if user_dp is not None:
            self.user_level = UserLevelStep(user_dp, self.specs.server.noise_seed, self.state.user_dp_events,
                                            self.view.user_level)
        say(f"run directory {self.rundir.path}  ({len(nodes)} clients, {self.spec.rounds} rounds, "
            f"aggregation {self.spec.aggregation}{', user-level DP' if user_dp else ''})")
        nodes = evaluation_sample(nodes, self.specs.server.fraction_evaluate, self.specs.server.seed)
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
        stopped = {}
        for server_round in range(self.state.round + 1, self.spec.rounds + 1):
            t0 = time.time()
            available = [n for n in sorted(self.grid.get_node_ids())
                         if self.names(n) not in self.view.exhausted and not self.names.is_ambiguous(n)]
            if len(available) < self.spec.min_clients:
                stopped = {"stopped": f"only {len(available)} clients still have budget "
                                      f"(min-clients {self.spec.min_clients})"}
                say(f"round {server_round}: {stopped['stopped']}; stopping cleanly")
                break
            outcome = self.train(server_round, self.sample(available), len(available))
            row = outcome.row()
            if not aggregated_update(row):
                say(f"round {server_round}: no usable update: {first_problem(row)}")
            if outcome.user_dp:  # counted and on disk before anything of the round leaves
                self._checkpoint_pending()
                say(f"round {server_round}: {self.user_level.line(outcome)}")
            if outcome.update is not None:
                self.state.adapter = {**self.state.adapter, **outcome.update}
                save_adapter(self.state.adapter, self.lora, self.base_model_path,
                             self.rundir.adapter_dir(server_round))
                row.update(self.evaluate(server_round, nodes))
            self.state.round = server_round
            self.rundir.write_privacy_view(self.view.to_dict())
            self.rundir.append_metrics({"round": server_round, **row, "seconds": time.time() - t0})
            self.shipping.after_round(server_round, nodes, row, outcome.update is not None, self.spec.rounds)
            self._checkpoint()
        self.shipping.at_end(nodes)
        completed = self.state.round
        self.rundir.log_event({"event": "stopped" if stopped else "finished", "rounds": completed, **stopped})
        return {**stopped, "rounds_completed": completed, "rounds_trained": self._rounds_trained()}

    def _rounds_trained(self) -> int:
        """Rounds (earlier processes' included, on resume) in which at least one client's update was aggregated."""
        path = self.rundir.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return len({row["round"] for row in rows if aggregated_update(row)})

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


def initial_state(adapter: dict, seed: int) -> ServerState:
    """Round 0. ``sampling`` (server.seed) serves the seeded selection without user-level DP only."""
    return ServerState(round=0, adapter=adapter, sampling=random.Random(seed))


def _train_name(reply) -> str | None:
    return str(reply.content["privacy"]["client"]) if "client" in reply.content.get("privacy", {}) else None


def _wait_for_nodes(grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1.0)
    return nodes

