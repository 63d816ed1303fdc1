"""The ClientApp: local DP-LoRA training and evaluation on data that never leaves the site.

Two inputs, two types (docs/THREAT-MODEL.md): the site's own policy (client.site: node
config in a deployment, the researcher's run config in a simulation) decides budget,
delta, records, ledger and noise; the coordinator's run config and message are a request
(client.request), validated and bounded against that policy. A request that cannot be
honoured is refused with its reasons, in the reply and in the site's own log (stderr), and
nothing trains; site-owned settings in the run config are logged and ignored.

A train reply carries the new adapter (the DP-SGD output), the example count and the
number of steps (both in clear: the record count is not hidden by add/remove DP), and the
site's privacy record. Under DP nothing else computed from training records leaves: no
train loss, no timing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_aggregation
from client.data import DataSpec, LocalData, load_local_data
from client.progress import site_progress
from client.request import RoundRequest
from client.shipment import receive_and_evaluate
from client.site import SitePolicy, is_deployment
from client.train import train_adapter
from privacy.mechanism.entropy import round_entropy
from privacy.mechanism.ledger import Entry, Ledger, fingerprint
from privacy.mechanism.policy import decide, default_delta
from slm.allocator import return_freed_memory, trim_freed_memory
from slm.base import resolve_device
from slm.config import request_config
from slm.errors import UserError
from slm.evaluate import evaluate
from slm.lora import (
    LoraSpec,
    a_factor_digest,
    adapter_state,
    attach,
    from_arrays,
    frozen_a_factors,
    sent_tensors,
    set_adapter_state,
    to_arrays,
)
from slm.quiet import quiet_libraries
from slm.recompute import recomputed_layers
from slm.tasks import Task

quiet_libraries()
app = ClientApp()


def site_and_data(context: Context, run_dir: str = "") -> tuple[dict, SitePolicy, LocalData]:
    """(the coordinator's validated run config, the site's policy, the site's records).

    A label task's verbalizers are the ones resolved against the site's records: the run
    config's when given (every label covered), else the site's own word labels.
    """
    config = request_config(context.run_config)
    if is_deployment(context.node_config):
        policy = SitePolicy.from_node_config(context.node_config)
        local = replace(load_local_data(policy.data_spec(config), 0, 1), name=policy.name)
        for ignored in policy.ignored_requests(context.run_config):
            site_log(policy, f"ignored the coordinator's {ignored}: that is the site's setting")
        return {**config, "data.verbalizers": local.verbalizers}, policy, local
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    local = load_local_data(DataSpec.from_config(config), partition_id, num_partitions)
    config = {**config, "data.verbalizers": local.verbalizers}
    return config, SitePolicy.for_simulation(config, local.name, run_dir), local


def site_log(policy: SitePolicy, text: str) -> None:
    """The site's own log: the ClientApp's stderr, which is the SuperNode's log in a deployment.

    A simulated site keeps quiet: its console is the researcher's, where lines naming who
    trained would sit next to a user-level DP run's cohort-size-only lines; the server's
    metrics already record every refusal with its reason.
    """
    if policy.deployment:
        print(f"[fedslm site {policy.name}] {text}", file=sys.stderr, flush=True)


def _model(config: dict, policy: SitePolicy, msg: Message, aggregation: str):
    """The base with the received adapter; with FFA-LoRA, our own A factors must be the server's."""
    round_cfg = msg.content["config"]
    device = resolve_device(policy.device_name(config),
                            "node config key 'device'" if policy.device else "config key 'model.device'")
    if config["model.return-freed-memory"]:
        return_freed_memory()  # process-wide, before the base is loaded
    model, tokenizer = attach(policy.model_name(config), LoraSpec.from_config(config), config["model.dtype"], device)
    received = from_arrays(msg.content["arrays"])
    if aggregation == "ffa":
        if a_factor_digest(adapter_state(model)) != round_cfg["lora-a-sha256"]:
            raise UserError("FFA-LoRA: this client's A factors differ from the server's (model or lora.seed mismatch)")
        received = {**adapter_state(model), **received}
    set_adapter_state(model, received)
    return model, tokenizer


def _reply(msg: Message, privacy: dict, metrics: dict, arrays=None) -> Message:
    content = RecordDict({"privacy": ConfigRecord(privacy), "metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A clear train round, or one stage of a secure one (client.secure_aggregation masks the reply)."""
    if secure_aggregation.requested(msg):
        return secure_aggregation.masked_train(msg, context, lambda m, c: train_clear(m, c, masked=True))
    return train_clear(msg, context)


def train_clear(msg: Message, context: Context, masked: bool = False) -> Message:
    """Train one round; ``masked``: the reply goes through SecAgg+ (client.secure_aggregation), not in clear."""
    round_cfg = msg.content["config"]
    config, policy, local = site_and_data(context, str(round_cfg.get("run-dir", "")))
    privacy = {"client": local.name, "dp": policy.dp_enabled, "noise_seed": "os-entropy"
               if policy.noise_seed < 0 else "fixed (not private against whoever knows it)"}
    try:
        request = RoundRequest.parse(config, round_cfg)
        problems = request.problems(policy, len(local.train))
    except (KeyError, TypeError, ValueError) as err:
        request, problems = None, [f"malformed request ({type(err).__name__}: {err})"]
    if policy.require_secure_aggregation and not masked:
        problems = [*problems, "this site trains only in secure-aggregation rounds (node config "
                    "require-secure-aggregation): a clear reply would show the coordinator its update"]
    if problems:
        reason = "; ".join(problems)
        site_log(policy, f"refused a train request: {reason}")
        return _reply(msg, {**privacy, "status": "rejected", "reason": reason}, {"num-examples": 0})
    started = time.time()
    model, tokenizer = _model(config, policy, msg, request.aggregation)
    steps, records = request.local_steps, len(local.train)
    q = request.batch_size / records
    ledger = entry = sigma = None
    if policy.dp_enabled:
        ledger = Ledger.open(policy.ledger_dir, fingerprint=fingerprint(local.train), records=records,
                             delta=policy.delta or default_delta(records))
        entry = Entry(run_id=request.run_id, round=request.server_round, noise_multiplier=0.0,
                      clip_norm=request.clip_norm, sample_rate=q, steps=steps, delta=ledger.delta,
                      epsilon_after=0.0, epsilon_rdp_after=0.0, max_epsilon=policy.max_epsilon, status="")
        refusal = _before_reserving(ledger, policy)
        if refusal is None:
            decision = decide(ledger, max_epsilon=policy.max_epsilon, requested_sigma=request.requested_sigma,
                              target_epsilon=request.target_epsilon, sample_rate=q, steps=steps,
                              rounds_left=request.rounds_left, max_noise_multiplier=policy.max_noise_multiplier)
            refusal = decision.reason if decision.refused else None
        if refusal is not None:
            entry = ledger.refuse(entry, refusal)
        else:
            sigma = decision.noise_multiplier
            entry = ledger.reserve(replace(entry, noise_multiplier=sigma), budget=policy.max_epsilon)
        if entry.status == "refused":  # on disk before anything is trained; spends nothing
            site_log(policy, f"refused round {request.server_round} of run {request.run_id}: {entry.reason}")
            return _reply(msg, {**privacy, **_privacy_fields(entry, ledger)}, {"num-examples": 0})
    with frozen_a_factors(model, freeze=request.aggregation == "ffa"), \
            recomputed_layers(model, config["train.recompute"]):  # a memory setting: same gradients
        result = train_adapter(model, tokenizer, Task.from_config(config), local.train, steps=steps,
                               batch_size=request.batch_size, lr=request.lr, noise_multiplier=sigma,
                               clip_norm=request.clip_norm,
                               seed=round_entropy(policy.noise_seed, local.name, request.run_id, request.server_round),
                               grad_sample_mode=config["train.grad-sample-mode"], autocast=config["train.autocast"],
                               # a memory setting, never the update's: a negative request runs in one piece
                               physical_batch_size=max(0, config["train.physical-batch-size"]),
                               on_step=site_progress(policy, config, lambda text: site_log(policy, text)).step)
    if config["model.return-freed-memory"]:
        trim_freed_memory()  # what training left in the heap, before this process evaluates
    metrics = {"num-examples": records, "steps": result.steps}
    if ledger is not None:
        entry = ledger.commit(entry)
        privacy.update(_privacy_fields(entry, ledger))
        site_log(policy, f"round {request.server_round} of run {request.run_id}: trained with sigma "
                             f"{sigma:.3f}, spent {entry.epsilon_after:.3f} of {policy.max_epsilon:g}")
    else:  # no DP, no privacy claim: the training metrics may as well leave
        privacy.update({"status": "no-dp", "sample_rate": q, "steps": steps})
        metrics.update({"train_loss": result.loss, "seconds": time.time() - started})
    arrays = to_arrays(sent_tensors(adapter_state(model), request.aggregation), config["server.wire-dtype"])
    return _reply(msg, privacy, metrics, arrays)


def _before_reserving(ledger: Ledger, policy: SitePolicy) -> str | None:
    """Site-side reasons not to train at all this round (checked again under the ledger's lock)."""
    if ledger.data_changed:
        return ledger.data_change_reason()
    if ledger.delta * ledger.records >= 1:
        return (f"delta {ledger.delta:g} is not below 1/records (1/{ledger.records}): such a guarantee allows "
                "publishing a record outright")
    if ledger.path.exists() and policy.delta and policy.delta != ledger.delta:
        return (f"the site's delta {policy.delta:g} differs from its ledger's {ledger.delta:g}, fixed when the "
                "ledger was created; keep the ledger's delta or start a new ledger directory deliberately")
    return None


def _privacy_fields(entry: Entry, ledger: Ledger) -> dict:
    return {"status": entry.status, "noise_multiplier": entry.noise_multiplier, "clip_norm": entry.clip_norm,
            "sample_rate": entry.sample_rate, "steps": entry.steps, "delta": entry.delta,
            "epsilon": entry.epsilon_after, "epsilon_rdp": entry.epsilon_rdp_after,
            "max_epsilon": entry.max_epsilon, "accountant": entry.accountant, "sampling": entry.sampling,
            "records": ledger.records, "reason": entry.reason}


@app.evaluate("ship")
def evaluate_shipped(msg: Message, context: Context) -> Message:
    """A shipped GGUF: verify its sha256, store it in the model dir, evaluate it here, reply metrics only."""
    announced = dict(msg.content["config"])
    config, policy, local = site_and_data(context, str(announced.get("run-dir", "")))
    _check_evaluates(policy)
    if policy.deployment and not policy.shipped_dir:  # else the coordinator's run-dir would pick the directory
        site_log(policy, "refused a shipped model: no shipped-dir in the node config")
        raise UserError(f"site {policy.name} accepts no shipped models (its node config has no shipped-dir)")
    config = {**config, "model.name": policy.model_name(config), "ship.dir": policy.shipped_dir}
    path, metrics = receive_and_evaluate(msg.content["artifact"]["file"].numpy(), announced, config, local)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name, "stored": str(path),
                                                "quant": str(announced["quant"])})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the site's held-out records (metrics leave in clear: not DP)."""
    round_cfg = msg.content["config"]
    config, policy, local = site_and_data(context, str(round_cfg.get("run-dir", "")))
    _check_evaluates(policy)
    model, tokenizer = _model(config, policy, msg, str(round_cfg["aggregation"]))
    progress = site_progress(policy, config, lambda text: site_log(policy, text))
    metrics = evaluate(model, tokenizer, Task.from_config(config), local.test, on_progress=progress.evaluated)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name})})
    return Message(content=content, reply_to=msg)


def _check_evaluates(policy: SitePolicy) -> None:
    if not policy.evaluate:
        site_log(policy, "refused an evaluation request (node config evaluate = false)")
        raise UserError(f"site {policy.name} does not evaluate (its node config says evaluate = false)")
