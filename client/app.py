"""The ClientApp: local DP-LoRA training and evaluation on data that never leaves the site.

Two inputs, two types (docs/THREAT-MODEL.md): the site's own policy (client.site: node
config in a deployment, the researcher's run config in a simulation) decides budget,
delta, records, ledger, noise and which columns a task may name; the coordinator's run
config and message are a request (client.request), parsed whole and bounded against that
policy before the site reads its records for it or touches its ledger.

A train round is a transaction (privacy.mechanism.transaction): with a valid request and
the model built, the site reserves the round's spend (or refuses: budget, changed
records), trains, commits, and only then replies. What leaves: the new adapter (the
DP-SGD output), the example count and steps (in clear: add/remove DP does not hide the
count) and the privacy record. Under DP nothing else computed from training records
leaves: no train loss, no timing, no error text — every handler is ``guarded``
(client.outbound): a deployed site replies to any failure with a reason code only.
"""

from __future__ import annotations

import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_aggregation
from client.adam_bc import optimizer_for
from client.data import DataSpec, LocalData, load_local_data
from client.evaluation import SiteEvaluation, digest_of
from client.outbound import Refused, guarded, site_log
from client.progress import site_progress
from client.request import Request, RoundRequest, parse_evaluation, parse_round
from client.shipment import receive_and_evaluate
from client.site import SitePolicy, is_deployment
from client.train import train_adapter
from client.units import largest_unit, training_units
from fedslm.common.config import request_config
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.ledger import Entry, fingerprint
from privacy.mechanism.policy import MAX_PARTICIPATIONS
from privacy.mechanism.randomness import round_key
from privacy.mechanism.record import NO_DP, REJECTED, PrivacyRecord, Reason
from privacy.mechanism.transaction import Grant, Release, SiteBudget, open_release
from slm.allocator import return_freed_memory, trim_freed_memory
from slm.base import resolve_device
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
from slm.tasks import Task, encode

quiet_libraries()
app = ClientApp()


def admitted(context: Context, round_cfg, parse) -> tuple[SitePolicy, Request, LocalData]:
    """(the site's policy, the coordinator's request, the site's records), or Refused.

    A deployed site parses the request against its node config BEFORE it reads its records:
    a request naming a column the site does not allow is refused unread. A simulation's
    policy is the researcher's run config, built with the records (it names the client).
    """
    if is_deployment(context.node_config):
        policy = SitePolicy.from_node_config(context.node_config)
        request, problems = parse(context.run_config, round_cfg, policy)
        if problems:
            raise Refused(Reason.OUT_OF_BOUNDS, "; ".join(problems), PrivacyRecord(client=policy.name, status=REJECTED))
        for ignored in policy.ignored_requests(context.run_config):
            site_log(policy.name, f"ignored the coordinator's {ignored}: that is the site's setting")
        verbalizers = policy.verbalizers if request.specs.task.task == "label" else ""
        specs = request.specs.changed("task", verbalizers=verbalizers)
        local = replace(load_local_data(policy.data_spec(specs), 0, 1), name=policy.name)
        return policy, replace(request, specs=specs), local
    specs = RunConfig.parse(request_config(context.run_config))  # the researcher's own file: a bad key is an error
    local = load_local_data(DataSpec.of(specs), int(context.node_config.get("partition-id", 0)),
                            int(context.node_config.get("num-partitions", 1)))
    specs = specs.changed("task", verbalizers=local.verbalizers)
    policy = SitePolicy.for_simulation(specs, local.name, str(round_cfg.get("run-dir", "")))
    request, problems = parse({**context.run_config, "data.verbalizers": local.verbalizers}, round_cfg, policy)
    if problems:
        raise Refused(Reason.OUT_OF_BOUNDS, "; ".join(problems), PrivacyRecord(client=local.name, status=REJECTED))
    return policy, replace(request, specs=specs), local


def _model(specs: RunConfig, policy: SitePolicy, msg: Message, aggregation: str):
    """The base with the received adapter; with FFA-LoRA, our own A factors must be the server's."""
    round_cfg = msg.content["config"]
    device = resolve_device(policy.device_name(specs),
                            "node config key 'device'" if policy.device else "config key 'model.device'")
    if specs.model.return_freed_memory:
        return_freed_memory()  # process-wide, before the base is loaded
    model, tokenizer = attach(policy.model_name(specs), LoraSpec.of(specs.lora), specs.model.dtype, device)
    received = from_arrays(msg.content["arrays"])
    if aggregation == "ffa":
        if a_factor_digest(adapter_state(model)) != round_cfg["lora-a-sha256"]:
            raise Refused(Reason.OUT_OF_BOUNDS, "FFA-LoRA: the coordinator's A factors differ from this site's "
                                                "(model or lora.seed mismatch)")
        received = {**adapter_state(model), **received}
    set_adapter_state(model, received)
    return model, tokenizer


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    """A clear train round, or one stage of a secure one (client.secure_aggregation masks the reply)."""
    if secure_aggregation.requested(msg):
        return secure_aggregation.masked_train(msg, context, lambda m, c: train_clear(m, c, masked=True))
    return train_clear(msg, context)


def train_clear(msg: Message, context: Context, masked: bool = False) -> Message:
    """Train one round; ``masked``: the reply goes through SecAgg+ (client.secure_aggregation), not in clear."""
    round_cfg = msg.content["config"]
    policy, request, local = admitted(context, round_cfg, parse_round)
    record = PrivacyRecord(client=local.name, status=REJECTED, dp=policy.dp_enabled,
                           noise_seed="os-entropy" if policy.noise_seed < 0 else
                           "fixed (not private against whoever knows it)", deployed=policy.deployment,
                           **policy.unit.record_fields())
    units = training_units(policy.unit, local.train)
    group = largest_unit(local.train, policy.group_field, "training records") if policy.group_field else 0
    if not policy.deployment:  # a deployed site states it only in its own `fedslm budget`, never on the wire
        record = replace(record, group_records=group)
    count, what = (len(local.train), "training records") if units is None else (len(units), f"{policy.unit.word}s")
    problems = [] if 1 <= request.batch_size <= count else [
        f"expected batch {request.batch_size}: the site has {count} {what}"]
    if request.local_steps * request.batch_size > MAX_PARTICIPATIONS * count:  # steps x q, unaccounted
        problems.append(f"{request.local_steps} steps at an expected batch of {request.batch_size} pass over the "
                        f"site's {count} {what} more than {MAX_PARTICIPATIONS:g} times in one round")
    if policy.require_secure_aggregation and not masked:
        problems.append("this site trains only in secure-aggregation rounds (node config "
                        "require-secure-aggregation): a clear reply would show the coordinator its update")
    if problems:
        raise Refused(Reason.OUT_OF_BOUNDS, "; ".join(problems), record)
    specs, train = request.specs, request.specs.train
    model, tokenizer = _model(specs, policy, msg, request.aggregation)
    task = Task.of(specs)
    # The site's own records must encode before anything is reserved; training takes them encoded.
    examples = [encode(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(local.train)]
    started, records = time.time(), len(local.train)
    q = request.batch_size / count
    grant = None
    if policy.dp_enabled:
        grant = _reserve(policy, request, local, q, digest_of(msg.content["arrays"]), record, count, group)
    with frozen_a_factors(model, freeze=request.aggregation == "ffa"), \
            recomputed_layers(model, train.recompute):  # a memory setting: same gradients
        result = train_adapter(model, tokenizer, task, examples, steps=request.local_steps,
                               batch_size=request.batch_size, lr=request.lr,
                               noise_multiplier=grant.noise_multiplier if grant else None,
                               clip_norm=request.clip_norm,
                               seed=round_key(policy.noise_seed, local.name, request.run_id, request.server_round),
                               grad_sample_mode=train.grad_sample_mode, autocast=train.autocast,
                               # a memory setting, never the update's: a negative request runs in one piece
                               physical_batch_size=max(0, train.physical_batch_size),
                               on_step=_progress(policy, specs).step, units=units,
                               max_records_per_unit=policy.unit.max_records,
                               make_optimizer=optimizer_for(train.optimizer, request.lr,
                                                            grant.noise_multiplier if grant else None,
                                                            request.clip_norm, request.batch_size))
    if specs.model.return_freed_memory:
        trim_freed_memory()  # what training left in the heap, before this process evaluates
    metrics = {"num-examples": records, "steps": result.steps}
    if grant is not None:
        entry = grant.commit()
        record = _with_entry(record, entry, records, count)
        _log(policy, f"round {request.server_round} of run {request.run_id}: trained with sigma "
                     f"{entry.noise_multiplier:.3f}, spent {entry.epsilon_after:.3f} of {policy.max_epsilon:g}")
    else:  # no DP, no privacy claim: the training metrics may as well leave
        record = replace(record, status=NO_DP, sample_rate=q, steps=request.local_steps, records=records,
                         units=count)
        metrics.update({"train_loss": result.loss, "seconds": time.time() - started})
    arrays = to_arrays(sent_tensors(adapter_state(model), request.aggregation), specs.server.wire_dtype)
    content = RecordDict({"privacy": ConfigRecord(record.to_config()), "metrics": MetricRecord(metrics),
                          "arrays": arrays})
    return Message(content=content, reply_to=msg)


def _reserve(policy: SitePolicy, request: RoundRequest, local: LocalData, q: float, adapter_sha256: str,
             record: PrivacyRecord, units: int, group: int) -> Grant:
    """The round's spend reserved on the site's disk, or Refused (the refusal recorded in its ledger)."""
    budget = SiteBudget(ledger_dir=policy.ledger_dir, max_epsilon=policy.max_epsilon, delta=policy.delta,
                        max_noise_multiplier=policy.max_noise_multiplier)
    release = Release(run_id=request.run_id, round=request.server_round, clip_norm=request.clip_norm, sample_rate=q,
                      steps=request.local_steps, requested_sigma=request.requested_sigma,
                      target_epsilon=request.target_epsilon, rounds_left=request.rounds_left,
                      adapter_sha256=adapter_sha256, unit=policy.unit.ledger_label,
                      records_per_unit=policy.unit.max_records if not policy.unit.record_level else 1,
                      group_records=group)
    outcome = open_release(budget, release, fingerprint=fingerprint(local.train), records=units)
    if isinstance(outcome, Grant):
        return outcome
    if outcome.entry is not None:
        record = _with_entry(record, outcome.entry, len(local.train), units)
    _log(policy, f"refused round {request.server_round} of run {request.run_id}: {outcome.detail}")
    raise Refused(outcome.reason, outcome.detail, record)


def _with_entry(record: PrivacyRecord, entry: Entry, records: int, units: int) -> PrivacyRecord:
    return replace(record, status=entry.status, noise_multiplier=entry.noise_multiplier, clip_norm=entry.clip_norm,
                   sample_rate=entry.sample_rate, steps=entry.steps, delta=entry.delta, epsilon=entry.epsilon_after,
                   epsilon_rdp=entry.epsilon_rdp_after, max_epsilon=entry.max_epsilon, accountant=entry.accountant,
                   sampling=entry.sampling, records=records, units=units)


def _log(policy: SitePolicy, text: str) -> None:
    """A line in a deployed site's own log. A simulated site keeps quiet: its console is the researcher's,
    where lines naming who trained would sit next to a user-level DP run's cohort-size-only lines."""
    if policy.deployment:
        site_log(policy.name, text)


def _progress(policy: SitePolicy, specs: RunConfig):
    return site_progress(policy, specs.user_dp.enabled, lambda text: _log(policy, text))


@app.evaluate("ship")
@guarded
def evaluate_shipped(msg: Message, context: Context) -> Message:
    """A shipped GGUF: verify its sha256, store it in the model dir, evaluate it here, reply metrics only."""
    announced = dict(msg.content["config"])
    policy, request, local = admitted(context, announced, parse_evaluation)
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


@app.evaluate()
@guarded
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the site's held-out records (client.evaluation: what a deployed site allows)."""
    round_cfg = msg.content["config"]
    policy, request, local = admitted(context, round_cfg, parse_evaluation)
    site = _site_evaluation(policy, local, request, digest_of(msg.content["arrays"]))
    task = Task.of(request.specs)
    if site is not None:
        site.admit(task)  # refused before the model is built; the DP charge reserved before the records are read
    model, tokenizer = _model(request.specs, policy, msg, request.aggregation)
    progress = _progress(policy, request.specs)
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

