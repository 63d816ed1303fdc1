"""One train round on a site, once admitted (client.app): a transaction (privacy.mechanism.transaction).

With a valid request and the model built, the site reserves the round's spend (or refuses:
budget, changed records), trains, commits, and only then replies. What leaves: the new
adapter (the DP-SGD output), the example count and steps (in clear: add/remove DP does not
hide the count) and the privacy record. Under DP nothing else computed from training
records leaves: no train loss, no timing.

This room holds what a round needs from torch, peft and Opacus; client.app imports it only
for a message that trains.
"""

from __future__ import annotations

import time
from dataclasses import replace

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.adam_bc import optimizer_for
from client.data import LocalData
from client.evaluation import digest_of
from client.outbound import Refused
from client.progress import round_progress, site_note
from client.received_model import received_model
from client.request import RoundRequest
from client.site import SitePolicy
from client.train import train_adapter
from client.units import largest_unit, training_units
from privacy.mechanism.ledger import Entry, fingerprint
from privacy.mechanism.policy import MAX_PARTICIPATIONS
from privacy.mechanism.randomness import round_key
from privacy.mechanism.record import NO_DP, REJECTED, PrivacyRecord, Reason
from privacy.mechanism.transaction import Grant, Release, SiteBudget, open_release
from slm.allocator import trim_freed_memory
from slm.lora import adapter_state, frozen_a_factors, sent_tensors, to_arrays
from slm.recompute import recomputed_layers
from slm.tasks import Task, encode


def train_round(msg: Message, policy: SitePolicy, request: RoundRequest, local: LocalData, masked: bool) -> Message:
    """Train one admitted round; ``masked``: the reply goes through SecAgg+ (client.secure_aggregation)."""
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
    model, tokenizer = received_model(specs, policy, msg, request.aggregation)
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
                               on_step=round_progress(policy, specs).step, units=units,
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
        site_note(policy, f"round {request.server_round} of run {request.run_id}: trained with sigma "
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
    site_note(policy, f"refused round {request.server_round} of run {request.run_id}: {outcome.detail}")
    raise Refused(outcome.reason, outcome.detail, record)


def _with_entry(record: PrivacyRecord, entry: Entry, records: int, units: int) -> PrivacyRecord:
    return replace(record, status=entry.status, noise_multiplier=entry.noise_multiplier, clip_norm=entry.clip_norm,
                   sample_rate=entry.sample_rate, steps=entry.steps, delta=entry.delta, epsilon=entry.epsilon_after,
                   epsilon_rdp=entry.epsilon_rdp_after, max_epsilon=entry.max_epsilon, accountant=entry.accountant,
                   sampling=entry.sampling, records=records, units=units)
