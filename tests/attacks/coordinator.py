"""A hostile coordinator, as a test fixture: it crafts the messages a ServerApp could send.

It talks to the real ClientApp functions (client.app.train / evaluate_adapter) with a real
Flower Message and Context, exactly as a SuperNode would hand them over, for a site whose
node config, records and ledger live in a temporary directory. It never touches the site's
disk itself: everything it learns comes from the replies.

``independent_epsilon`` recomputes what the site released from the replies alone, with
Google's dp_accounting PLD accountant (not the PRV accountant the site uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedslm.common.config import resolve
from slm.lora import LoraSpec, a_factor_digest, adapter_state, attach, sent_tensors, to_arrays

HONEST = {"model.name": "tiny", "model.max-length": 32, "train.local-steps": 2, "train.batch-size": 4,
          "data.max-eval-examples": 4, "server.rounds": 3}


def qa_file(path: Path, n: int, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"question": f"{tag}What is condition {i}?",
                                        "answer": f"Condition {i} is a rare disorder."}) + "\n" for i in range(n)))
    return path


@dataclass
class Site:
    """One deployed site: its node config (the only thing it trusts) and where its files live."""

    root: Path
    max_epsilon: float = 2.0
    records: int = 40
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = qa_file(self.root / "records.jsonl", self.records)
        self.ledger_dir = self.root / "ledger"
        self.node_config = {"name": "site-a", "data-path": str(self.data), "ledger-dir": str(self.ledger_dir),
                            "max-epsilon": self.max_epsilon, "model-dir": "tiny", "fields": "question,answer",
                            **self.extra}

    def ledger(self) -> dict:
        return json.loads((self.ledger_dir / "ledger.json").read_text())


class Coordinator:
    """Sends train and evaluate requests of its own making; keeps every reply."""

    def __init__(self):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        config = resolve(HONEST)
        model, _ = attach("tiny", LoraSpec.from_config(config))
        self.adapter = adapter_state(model)
        self.replies: list[Message] = []

    def message(self, kind: str, *, server_round: int = 1, num_rounds: int = 3, run_id: str = "run-1",
                aggregation: str = "ffa", adapter: dict | None = None, wire: str = "float16",
                **round_extra) -> Message:
        """A message of the coordinator's making; ``adapter``: a crafted one instead of the honest initial adapter."""
        adapter = self.adapter if adapter is None else adapter
        config = {"num-rounds": num_rounds, "server-round": server_round, "run-id": run_id, "run-dir": "/nonexistent",
                  "aggregation": aggregation, "lora-a-sha256": a_factor_digest(adapter), **round_extra}
        content = RecordDict({"arrays": to_arrays(sent_tensors(adapter, "ffa"), wire),
                              "config": ConfigRecord(config)})
        return Message(content=content, dst_node_id=7, message_type=kind)

    def context(self, site: Site, run_config: dict | None = None) -> Context:
        return Context(run_id=1, node_id=7, node_config=site.node_config, state=RecordDict(),
                       run_config={**HONEST, **(run_config or {})})

    def train(self, site: Site, run_config: dict | None = None, **round_fields) -> Message:
        from client.app import train

        reply = train(self.message("train", **round_fields), self.context(site, run_config))
        self.replies.append(reply)
        return reply

    def site_context(self, site: Site, node_id: int = 7) -> Context:
        """A site's Context for a SecAgg+ run: its state persists across the four stages, as in a SuperNode."""
        return Context(run_id=1, node_id=node_id, node_config=site.node_config, state=RecordDict(),
                       run_config=dict(HONEST))

    def secure_stage(self, context: Context, configs: dict, train_request: bool = False) -> Message:
        """One SecAgg+ stage of the coordinator's making (``configs``: the stage's secaggplus_configs);
        with ``train_request`` it also carries an honest train request, as the masked stage does."""
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        from client.app import train

        content = self.message("train").content if train_request else RecordDict()
        content[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        reply = train(Message(content=content, dst_node_id=context.node_id, message_type="train"), context)
        self.replies.append(reply)
        return reply

    def evaluate(self, site: Site, run_config: dict | None = None, **round_fields) -> Message:
        from client.app import evaluate_adapter

        reply = evaluate_adapter(self.message("evaluate", **round_fields), self.context(site, run_config))
        self.replies.append(reply)
        return reply

    def released(self) -> list[dict]:
        """The privacy records of every release: train replies with an adapter, DP evaluations with metrics."""
        return [dict(r.content["privacy"]) for r in self.replies if "arrays" in r.content
                or ("privacy" in r.content and r.content["privacy"].get("mechanism") == "dp-evaluation"
                    and r.content["privacy"]["status"] == "committed")]


def wire_text(reply: Message) -> str:
    """Everything a reply carries, as the coordinator could read it: every record's keys and values, array
    names and bytes (as hex), and a Flower error's text."""
    parts = []
    if reply.has_error():
        parts.append(str(reply.error.reason))
    if reply.has_content():
        for key, record in reply.content.items():
            parts.append(key)
            for name, value in record.items():  # an array's bytes as hex (their repr would make up words by chance)
                parts.append(f"{name}={value.numpy().tobytes().hex()}" if hasattr(value, "numpy") else
                             f"{name}={value!r}")
    return "\n".join(parts)


def independent_epsilon(released: list[dict], delta: float) -> float:
    """Epsilon of every released round, composed by dp_accounting's PLD accountant (Poisson subsampled Gaussian)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for r in released:
        gaussian = dp_accounting.GaussianDpEvent(r["noise_multiplier"])
        event = gaussian if r["sample_rate"] == 1 else dp_accounting.PoissonSampledDpEvent(r["sample_rate"], gaussian)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(r["steps"])))
    return accountant.get_epsilon(delta)
