"""The server's round loop over Flower's Grid.

We drive the Grid directly instead of ``FedAvg.start`` because a privacy-aware server
needs more than a strategy hook offers: a round-0 federated evaluation, per-client
progress lines, the clients' privacy records kept per round, clients that refused
("budget exhausted") left out of later sampling, validation of every reply, optional
user-level DP, a checkpoint after every round, and a run that stops cleanly (keeping its
outputs) when too few clients remain.

Clients are ordered by the names they report (not by Flower's node ids, which change
with every simulation), so sampling is reproducible across a resume.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from privacy.mechanism.accountant import SgmEvent, epsilon
from server import checkpoint
from server.aggregate import aggregate, resolve_aggregation
from server.checkpoint import ServerState
from server.rundir import RunDir
from server.ship import build_artifacts, parse_quants, ship_messages
from server.user_dp import UserDpSpec, clip_update, noisy_mean
from server.validate import Rejected, validate_update
from slm.errors import UserError
from slm.lora import (
    LoraSpec,
    a_factor_digest,
    from_arrays,
    save_adapter,
    sent_tensors,
    through_wire,
    to_arrays,
)


@dataclass
class PrivacyView:
    """What the server learns of each client's privacy spend (as reported by the client)."""

    clients: dict[str, list[dict]] = field(default_factory=dict)
    user_level: list[dict] = field(default_factory=list)
    exhausted: set[str] = field(default_factory=set)

    def record(self, server_round: int, name: str, fields: dict) -> None:
        self.clients.setdefault(name, []).append({"round": server_round, **fields})
        if fields.get("status") == "refused":
            self.exhausted.add(name)

    def to_dict(self) -> dict:
        return {"clients": self.clients, "user_level": self.user_level, "exhausted": sorted(self.exhausted)}

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyView":
        return cls(clients=data.get("clients", {}), user_level=data.get("user_level", []),
                   exhausted=set(data.get("exhausted", [])))


@dataclass(frozen=True)
class RoundSpec:
    rounds: int
    min_clients: int
    fraction_train: float
    timeout: float
    aggregation: str
    max_update_norm: float

    @classmethod
    def from_config(cls, config: dict) -> "RoundSpec":
        """Also rejects combinations that cannot work, before any client is contacted."""
        aggregation = resolve_aggregation(config["server.aggregation"], config["dp.enabled"])
        if config["user-dp.enabled"] and aggregation == "svd":
            raise UserError("user-dp.enabled needs server.aggregation fedavg or ffa: svd re-factorizes each "
                            "client's product, which a clipped, noised mean of updates does not provide")
        if config["server.min-clients"] < 1 or config["server.rounds"] < 1:
            raise UserError("server.rounds and server.min-clients must be at least 1")
        return cls(rounds=config["server.rounds"], min_clients=config["server.min-clients"],
                   fraction_train=config["server.fraction-train"], timeout=config["server.timeout"],
                   aggregation=aggregation,
                   max_update_norm=config["server.max-update-norm"])


def say(text: str) -> None:
    print(f"[fedslm] {text}", flush=True)


class Federation:
    """One run: the Grid, the config, the run directory and the evolving server state."""

    def __init__(self, grid, config: dict, rundir: RunDir, state: ServerState, base_model_path: str):
        self.grid, self.config, self.rundir, self.state = grid, config, rundir, state
        self.spec = RoundSpec.from_config(config)
        self.lora = LoraSpec.from_config(config)
        self.base_model_path = base_model_path
        self.view = PrivacyView.from_dict(state.privacy_view)
        self.names: dict[int, str] = {}
        self.user_dp: UserDpSpec | None = None
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
        return list(self.grid.send_and_receive(messages, timeout=self.spec.timeout))

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    # ---- evaluation ----------------------------------------------------------------
    def evaluate(self, server_round: int, nodes, replies=None, label: str = "eval") -> dict:
        """Token-weighted federated eval loss (and accuracies) over the clients' held-out splits."""
        per_client, loss_sum, tokens, errors = {}, 0.0, 0.0, []
        if replies is None:
            replies = self._send(nodes, "evaluate", server_round)
        for reply in replies:
            if reply.has_error():
                errors.append(f"{self._name(reply.metadata.src_node_id)}: {_last_line(reply.error.reason)}")
                continue
            name = str(reply.content["info"]["client"])
            self.names[reply.metadata.src_node_id] = name
            metrics = dict(reply.content["metrics"])
            per_client[name] = metrics
            loss_sum += metrics["eval_loss"] * metrics["eval_tokens"]
            tokens += metrics["eval_tokens"]
        summary = {"eval_loss": loss_sum / tokens if tokens else math.nan, "eval_clients": per_client}
        for key in ("accuracy", "top1_accuracy", "top3_accuracy"):
            weighted = [(m[key], m["eval_examples"]) for m in per_client.values() if key in m]
            if weighted:
                summary[key] = sum(v * n for v, n in weighted) / max(sum(n for _, n in weighted), 1)
        if errors:
            summary["eval_errors"] = errors
        clients = ", ".join(f"{n} {m['eval_loss']:.4f}" for n, m in sorted(per_client.items()))
        if len(per_client) > 8:  # phones: a range, not a thousand names
            losses = sorted(m["eval_loss"] for m in per_client.values())
            clients = f"{len(per_client)} clients, {losses[0]:.4f} to {losses[-1]:.4f}"
        say(f"round {server_round}: {label} loss {summary['eval_loss']:.4f}  ({clients})")
        for error in errors:
            say(f"round {server_round}: evaluation failed on {error}")
        return summary

    # ---- shipping ------------------------------------------------------------------
    def ship(self, server_round: int, nodes, fp32: dict) -> None:
        """Export this round's model, ship each file to every client, record their evaluations."""
        quants = parse_quants(self.config["ship.quantizations"])
        artifacts = build_artifacts(self.rundir.path, self.config, server_round, quants,
                                    eval_metrics={"eval_loss": fp32.get("eval_loss")})
        results = {"fp32": {k: fp32[k] for k in ("eval_loss", "eval_clients", "accuracy") if k in fp32}}
        for artifact in artifacts:
            messages = ship_messages(artifact, nodes, {**self.base_cfg, "server-round": server_round})
            replies = list(self.grid.send_and_receive(messages, timeout=self.spec.timeout))
            summary = self.evaluate(server_round, nodes, replies=replies, label=f"shipped {artifact.quant} eval")
            results[artifact.quant] = {**summary, "sha256": artifact.sha256, "bytes": artifact.bytes,
                                       "file": artifact.path.name}
        self.rundir.append_metrics({"round": server_round, "shipped": results})

    # ---- training ------------------------------------------------------------------
    def sample(self, available: list[int]) -> list[int]:
        ordered = sorted(available, key=lambda n: (self._name(n), n))
        if self.user_dp is not None:  # Poisson over clients: what the user-level accountant assumes
            return [n for n in ordered if self.state.sampling.random() < self.user_dp.sample_rate]
        k = max(self.spec.min_clients, math.ceil(self.spec.fraction_train * len(ordered)))
        return sorted(self.state.sampling.sample(ordered, min(k, len(ordered))))

    def train(self, server_round: int, sampled: list[int], eligible: int) -> tuple[dict | None, dict]:
        """Send the adapter to the sampled clients; return (new sent tensors or None, metrics row)."""
        wire = self.config["server.wire-dtype"]
        sent = through_wire(sent_tensors(self.state.adapter, self.spec.aggregation), wire)  # what clients get
        states, weights, losses = [], [], []
        row = {"sampled": len(sampled), "participants": [], "refused": [], "failed": [], "rejected": []}
        replies = self._send(sampled, "train", server_round)
        for node in set(sampled) - {r.metadata.src_node_id for r in replies}:
            row["failed"].append({"client": self._name(node), "reason": f"no reply within {self.spec.timeout:g}s"})
            say(f"round {server_round}: {self._name(node)} did not reply within {self.spec.timeout:g}s")
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                row["failed"].append({"client": self._name(node), "reason": _last_line(reply.error.reason)})
                say(f"round {server_round}: {self._name(node)} failed: {_last_line(reply.error.reason)}")
                continue
            privacy, metrics = dict(reply.content["privacy"]), dict(reply.content["metrics"])
            name = str(privacy.get("client", self._name(node)))
            self.names[node] = name
            self.view.record(server_round, name, privacy)
            if privacy.get("status") == "refused":
                row["refused"].append({"client": name, "reason": privacy.get("reason", "")})
                say(f"round {server_round}: {name} refused: {privacy.get('reason', '')}")
                continue
            try:
                if "arrays" not in reply.content:
                    raise Rejected("no adapter tensors in the reply")
                state = from_arrays(reply.content["arrays"])
                norm = validate_update(state, sent, self.spec.max_update_norm)
            except Rejected as why:
                row["rejected"].append({"client": name, "reason": str(why)})
                say(f"round {server_round}: {name} rejected: {why}")
                continue
            states.append(state)
            weights.append(metrics["num-examples"])
            losses.append((metrics["train_loss"], metrics["num-examples"]))
            eps = f", eps {privacy['epsilon']:.3f} (sigma {privacy['noise_multiplier']:.3f})" if "epsilon" in privacy else ""
            say(f"round {server_round}: {name} train loss {metrics['train_loss']:.4f} on "
                f"{int(metrics['num-examples'])} records in {metrics['seconds']:.1f}s{eps}")
            row["participants"].append({"client": name, "update_norm": norm, **metrics})
        row["bytes_up"] = sum(to_arrays(s, wire).count_bytes() for s in states)
        row["bytes_down"] = to_arrays(sent, wire).count_bytes() * len(sampled)
        if len(states) < self.spec.min_clients and self.user_dp is None:
            say(f"round {server_round}: {len(states)} valid replies < min-clients {self.spec.min_clients}; "
                "round skipped")
            row["skipped"] = True
            return None, row
        if losses:
            row["train_loss"] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        if self.user_dp is not None:
            return self._private_mean(server_round, states, sent, eligible, row), row
        return aggregate(self.spec.aggregation, states, weights), row

    def _private_mean(self, server_round: int, states, sent, eligible: int, row: dict) -> dict:
        spec = self.user_dp
        clipped, norms = zip(*(clip_update({k: s[k] - sent[k] for k in sent}, spec.clip_norm) for s in states)) \
            if states else ((), ())
        delta = noisy_mean(list(clipped), sent, spec, eligible, self.state.noise)
        self.state.user_dp_events.append(spec.event().to_dict())
        eps = epsilon([SgmEvent(**e) for e in self.state.user_dp_events], delta=spec.delta)
        record = {"round": server_round, "clip_norm": spec.clip_norm, "noise_multiplier": spec.noise_multiplier,
                  "sample_rate": spec.sample_rate, "eligible": eligible, "cohort": len(states),
                  "clipped_fraction": sum(n > spec.clip_norm for n in norms) / max(len(norms), 1),
                  "delta": spec.delta, "epsilon": eps, "accountant": "prv", "sampling": "poisson"}
        self.view.user_level.append(record)
        row["user_dp"] = record
        say(f"round {server_round}: user-level DP over {len(states)} clients (expected {spec.sample_rate * eligible:.1f}), "
            f"user-level eps {eps:.3f} at delta {spec.delta:.2g}")
        return {k: (sent[k].double() + delta[k]).to(sent[k].dtype) for k in sent}

    # ---- the run -------------------------------------------------------------------
    def run(self, resumed: bool) -> dict:
        nodes = _wait_for_nodes(self.grid, self.spec.min_clients, self.spec.timeout)
        if len(nodes) < self.spec.min_clients:
            say(f"only {len(nodes)} clients connected, fewer than min-clients {self.spec.min_clients}; stopping")
            return {"stopped": "too few clients", "rounds_completed": self.state.round}
        self.user_dp = UserDpSpec.from_config(self.config, len(nodes))
        say(f"run directory {self.rundir.path}  ({len(nodes)} clients, {self.spec.rounds} rounds, "
            f"aggregation {self.spec.aggregation}{', user-level DP' if self.user_dp else ''})")
        nodes = evaluation_sample(nodes, self.config["server.fraction-evaluate"], self.config["server.seed"])
        started = time.time()
        if resumed:
            say(f"resuming after round {self.state.round}")
            self.rundir.log_event({"event": "resumed", "after_round": self.state.round})
            self.evaluate(self.state.round, nodes)  # also learns the clients' names for ordered sampling
        else:
            save_adapter(self.state.adapter, self.lora, self.base_model_path, self.rundir.adapter_dir(0))
            first = self.evaluate(0, nodes)
            self.rundir.append_metrics({"round": 0, **first, "seconds": time.time() - started})
            self._checkpoint()
        outcome = {}
        for server_round in range(self.state.round + 1, self.spec.rounds + 1):
            t0 = time.time()
            available = [n for n in sorted(self.grid.get_node_ids()) if self._name(n) not in self.view.exhausted]
            if len(available) < self.spec.min_clients:
                outcome = {"stopped": f"only {len(available)} clients still have budget "
                                      f"(min-clients {self.spec.min_clients})"}
                say(f"round {server_round}: {outcome['stopped']}; stopping cleanly")
                break
            new, row = self.train(server_round, self.sample(available), len(available))
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
        return {**outcome, "rounds_completed": completed}

    def _ship(self, server_round: int, nodes, fp32: dict) -> None:
        if parse_quants(self.config["ship.quantizations"]):
            self.ship(server_round, nodes, fp32)

    def _checkpoint(self) -> None:
        self.state.privacy_view = self.view.to_dict()
        checkpoint.save(self.rundir.path, self.state)


def initial_state(adapter: dict, config: dict) -> ServerState:
    seed = config["server.seed"]
    noise_seed = config["server.noise-seed"] if config["server.noise-seed"] >= 0 else secrets.randbits(63)
    return ServerState(round=0, adapter=adapter, sampling=random.Random(seed),
                       noise=torch.Generator().manual_seed(noise_seed))


def evaluation_sample(nodes: list[int], fraction: float, seed: int) -> list[int]:
    """The clients that evaluate (and receive shipped models): all, or a fixed seeded sample.

    With thousands of phones, evaluating every client every round costs more than the
    training; the same sample every round keeps the rounds' losses comparable.
    """
    if not 0 < fraction <= 1:
        raise UserError("config key 'server.fraction-evaluate': must be in (0, 1]")
    if fraction == 1:
        return nodes
    k = max(1, math.ceil(fraction * len(nodes)))
    return sorted(random.Random(seed).sample(sorted(nodes), k))


def _wait_for_nodes(grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1.0)
    return nodes


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
