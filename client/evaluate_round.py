"""An evaluation on a site, once admitted (client.app): of the received adapter, or of a shipped GGUF.

A deployed site evaluates under its own rules (client.evaluation: allowed or not, a DP
charge reserved before its records are read, noised metrics); a simulated site evaluates
the researcher's records in clear. Like client.train_round, this room holds what needs
torch and the model; client.app imports it only for a message it admitted.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.data import LocalData
from client.evaluation import SiteEvaluation, digest_of
from client.outbound import Refused
from client.progress import round_progress
from client.received_model import received_model
from client.request import Request
from client.shipment import receive_and_evaluate
from client.site import SitePolicy
from privacy.mechanism.record import Reason
from slm.evaluate import evaluate
from slm.tasks import Task


def evaluate_shipment(msg: Message, policy: SitePolicy, request: Request, local: LocalData) -> Message:
    """A shipped GGUF: verify its sha256, store it in the model dir, evaluate it here, reply metrics only."""
    announced = dict(msg.content["config"])
    if policy.deployment and not policy.shipped_dir:  # else the coordinator's run-dir would pick the directory
        raise Refused(Reason.OUT_OF_BOUNDS, "a shipped model: no shipped-dir in the node config")
    specs = request.specs.changed("model", name=policy.model_name(request.specs))
    specs = specs.changed("ship", dir=policy.shipped_dir)
    site = _site_evaluation(policy, local, request, str(announced.get("sha256", "")))

    def site_rules(model, tokenizer, task, records) -> dict:  # after the verified file is stored
        site.admit(task)
        return site.metrics(model, tokenizer, task)

    path, metrics = receive_and_evaluate(msg.content["artifact"]["file"].numpy(), announced, specs, local,
                                         evaluate_fn=site_rules if site is not None else evaluate)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name, "stored": path.name,  # never the site's path
                                                "quant": str(announced["quant"])})})
    if site is not None:
        content["privacy"] = ConfigRecord(site.record().to_config())
    return Message(content=content, reply_to=msg)


def evaluate_received(msg: Message, policy: SitePolicy, request: Request, local: LocalData) -> Message:
    """Evaluate the received adapter on the site's held-out records (client.evaluation: what a deployed site allows)."""
    site = _site_evaluation(policy, local, request, digest_of(msg.content["arrays"]))
    task = Task.of(request.specs)
    if site is not None:
        site.admit(task)  # refused before the model is built; the DP charge reserved before the records are read
    model, tokenizer = received_model(request.specs, policy, msg, request.aggregation)
    progress = round_progress(policy, request.specs)
    if site is None:
        metrics = evaluate(model, tokenizer, task, local.test, on_progress=progress.evaluated)
    else:
        metrics = site.metrics(model, tokenizer, task, on_progress=progress.evaluated)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name})})
    if site is not None:
        content["privacy"] = ConfigRecord(site.record().to_config())
    return Message(content=content, reply_to=msg)


def _site_evaluation(policy: SitePolicy, local: LocalData, request: Request, subject: str) -> SiteEvaluation | None:
    """A deployed site's evaluation rules (None in a simulation: the researcher's own records, in clear)."""
    return SiteEvaluation(policy, local, request, subject) if policy.deployment else None
