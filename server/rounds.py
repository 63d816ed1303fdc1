"""The server's round loop over Flower's Grid.

We drive the Grid directly instead of ``FedAvg.start`` because a privacy-aware server
needs more than a strategy hook offers: a round-0 federated evaluation of the initial
adapter, a per-client progress line, the clients' privacy records kept per round,
clients that refused ("budget exhausted") left out of later sampling, and a run that
stops cleanly, keeping its outputs, when too few clients remain.

The global adapter is passed explicitly from round to round (never stashed on an object).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from server.aggregate import average_lora_factors
from server.rundir import RunDir
from slm.lora import LoraSpec, from_arrays, save_adapter, to_arrays


@dataclass
class PrivacyView:
    """What the server learns of each client's privacy spend (as reported by the client)."""

    rounds: dict[str, list[dict]] = field(default_factory=dict)
    exhausted: set[int] = field(default_factory=set)

    def record(self, server_round: int, node_id: int, fields: dict) -> None:
        self.rounds.setdefault(str(fields.get("client", node_id)), []).append(
            {"round": server_round, "node_id": node_id, **fields})
        if fields.get("status") == "refused":
            self.exhausted.add(node_id)

    def to_dict(self) -> dict:
        return {"clients": self.rounds, "exhausted_nodes": sorted(self.exhausted)}


@dataclass(frozen=True)
class RoundSpec:
    rounds: int
    min_clients: int
    fraction_train: float
    timeout: float
    seed: int

    @classmethod
    def from_config(cls, config: dict) -> "RoundSpec":
        return cls(rounds=config["server.rounds"], min_clients=config["server.min-clients"],
                   fraction_train=config["server.fraction-train"], timeout=config["server.timeout"],
                   seed=config["server.seed"])


def say(text: str) -> None:
    print(f"[fedslm] {text}", flush=True)


def _messages(grid, node_ids, message_type: str, arrays, config: dict) -> list[Message]:
    return [Message(content=RecordDict({"arrays": to_arrays(arrays), "config": ConfigRecord(config)}),
                    message_type=message_type, dst_node_id=node_id) for node_id in node_ids]


def _wait_for_nodes(grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1.0)
    return nodes


def evaluate_round(grid, server_round: int, arrays, node_ids, base_cfg: dict, spec: RoundSpec) -> dict:
    replies = grid.send_and_receive(_messages(grid, node_ids, "evaluate", arrays, base_cfg), timeout=spec.timeout)
    per_client, loss_sum, tokens, errors = {}, 0.0, 0.0, []
    for reply in replies:
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        metrics = dict(reply.content["metrics"])
        name = str(reply.content["info"]["client"])
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
    say(f"round {server_round}: eval loss {summary['eval_loss']:.4f}  ({clients})")
    for error in errors:
        say(f"round {server_round}: evaluation failed on {error}")
    return summary


def train_round(grid, server_round: int, arrays, node_ids, base_cfg, spec: RoundSpec, view: PrivacyView):
    """Send the adapter to the sampled clients; return (new adapter or None, metrics row)."""
    replies = grid.send_and_receive(_messages(grid, node_ids, "train", arrays, base_cfg), timeout=spec.timeout)
    states, weights, losses, row = [], [], [], {"participants": [], "refused": [], "failed": []}
    bytes_up = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            row["failed"].append({"node_id": node, "reason": reply.error.reason})
            say(f"round {server_round}: node {node} failed: {reply.error.reason.strip().splitlines()[-1]}")
            continue
        privacy = dict(reply.content["privacy"])
        metrics = dict(reply.content["metrics"])
        view.record(server_round, node, privacy)
        name = privacy.get("client", str(node))
        if privacy.get("status") == "refused":
            row["refused"].append({"client": name, "reason": privacy.get("reason", "")})
            say(f"round {server_round}: {name} refused: {privacy.get('reason', '')}")
            continue
        record = reply.content["arrays"]
        bytes_up += record.count_bytes()
        states.append(from_arrays(record))
        weights.append(metrics["num-examples"])
        losses.append((metrics["train_loss"], metrics["num-examples"]))
        eps = f", eps {privacy['epsilon']:.3f} (sigma {privacy['noise_multiplier']:.3f})" if "epsilon" in privacy else ""
        say(f"round {server_round}: {name} train loss {metrics['train_loss']:.4f} on "
            f"{int(metrics['num-examples'])} records in {metrics['seconds']:.1f}s{eps}")
        row["participants"].append({"client": name, "node_id": node, **metrics})
    row["bytes_up"] = bytes_up
    if len(states) < spec.min_clients:
        say(f"round {server_round}: {len(states)} valid replies < min-clients {spec.min_clients}; round skipped")
        row["skipped"] = True
        return None, row
    total = sum(n for _, n in losses)
    row["train_loss"] = sum(loss * n for loss, n in losses) / total
    return average_lora_factors(states, weights), row


def run_federation(grid, config: dict, rundir: RunDir, initial: dict, base_model_path: str) -> dict:
    spec = RoundSpec.from_config(config)
    lora = LoraSpec.from_config(config)
    view = PrivacyView()
    base_cfg = {"num-rounds": spec.rounds, "run-id": rundir.path.name, "run-dir": str(rundir.path)}
    nodes = _wait_for_nodes(grid, spec.min_clients, spec.timeout)
    if len(nodes) < spec.min_clients:
        say(f"only {len(nodes)} clients connected, fewer than min-clients {spec.min_clients}; stopping")
        return {"stopped": "too few clients", "rounds_completed": 0}
    say(f"run directory {rundir.path}  ({len(nodes)} clients, {spec.rounds} rounds)")
    arrays = initial
    save_adapter(arrays, lora, base_model_path, rundir.adapter_dir(0))
    started = time.time()
    first = evaluate_round(grid, 0, arrays, nodes, {**base_cfg, "server-round": 0}, spec)
    rundir.append_metrics({"round": 0, **first, "seconds": time.time() - started})
    rng = random.Random(spec.seed)
    completed, outcome = 0, {}
    for server_round in range(1, spec.rounds + 1):
        t0 = time.time()
        available = [n for n in sorted(grid.get_node_ids()) if n not in view.exhausted]
        if len(available) < spec.min_clients:
            outcome = {"stopped": f"only {len(available)} clients still have budget (min-clients {spec.min_clients})"}
            say(f"round {server_round}: {outcome['stopped']}; stopping cleanly")
            break
        k = max(spec.min_clients, math.ceil(spec.fraction_train * len(available)))
        sampled = sorted(rng.sample(available, min(k, len(available))))
        cfg = {**base_cfg, "server-round": server_round}
        new, row = train_round(grid, server_round, arrays, sampled, cfg, spec, view)
        rundir.write_privacy_view(view.to_dict())
        if new is not None:
            arrays = new
            completed = server_round
            save_adapter(arrays, lora, base_model_path, rundir.adapter_dir(server_round))
            row.update(evaluate_round(grid, server_round, arrays, nodes, cfg, spec))
        row["bytes_down"] = to_arrays(arrays).count_bytes() * len(sampled)
        rundir.append_metrics({"round": server_round, **row, "seconds": time.time() - t0})
    outcome.update({"rounds_completed": completed, "initial_eval_loss": first["eval_loss"]})
    return outcome
