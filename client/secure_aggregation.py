"""A site's side of secure aggregation: Flower's ``secaggplus_mod`` around our own train handler.

The coordinator drives Flower's SecAgg+ (server.secure_aggregation): four train messages per
round (setup, share keys, collect masked vectors, unmask). The mod answers all four with
Flower's code; in the third it calls ``bounded``, which runs the site's ordinary train
handler (request validated by client.request, ledger reserved and committed on the site),
then hands the mod a vector to mask. The mod empties every ArrayRecord of the reply before
it leaves, so the clear adapter never does; the privacy record and metrics go in clear.

The coordinator can no longer check a masked update (server.validate), so the site checks
its own before masking: the tensors and shapes it was sent, finite values, the update norm
within ``server.max-update-norm``, every value within the protocol's clipping range (so
quantization never clips it). An update failing a check is withheld: the site masks zeros
with weight 0 (the sum stays correct; the budget it spent stays spent) and says why in
clear. A refusal (budget, request out of bounds) is masked the same way.

The site's weight is min(records, W), W being the protocol's max_weight (the largest record
count reported so far, server.secure_aggregation), so it cannot overflow the masked sum.

A deployed site that requires secure aggregation (node config ``require-secure-aggregation``)
also bounds the protocol the coordinator runs, before Flower's mod sees a stage: Flower's
mod checks only the types of share_num and threshold, so a coordinator announcing a cohort
of one (share_num 1, threshold 1) would unmask the site's update. Each stage is checked
against the node config's ``min-secure-cohort`` (at least 3: with 2 sites each learns the
other's update from the sum) and against what this site accepted in the earlier stages:

- setup: share_num >= min-secure-cohort and share_num / 2 < threshold <= share_num. More
  than half (Bonawitz et al. 2017, Bell et al. 2020): each holder reveals, per site, either
  its share of the private-mask seed or of the mask key, never both, so no coordinator can
  collect a threshold of each from two disjoint halves of the holders.
- share keys: the public keys listed (this site's own among them) number at least
  min-secure-cohort and the threshold, and at most share_num.
- collect masked vectors (before training): the neighbours that sent this site their shares
  are distinct, were listed in share keys, and with this site number at least
  min-secure-cohort and the threshold; otherwise the site would mask against fewer.
- unmask: no site both active and dropped out (that would reveal both of its secrets), this
  site not called dropped out, every site named one that shared keys with this one, at least
  a threshold active.
- the stages in Flower's order from an accepted setup.

A violation is refused, not raised (an exception's text would travel to the coordinator):
the reply carries no ``secaggplus_configs`` record (no keys, no shares, no masked vector),
no arrays, a privacy record with status "rejected", ``num-examples`` 0, and the secure record
{contributed: false, weight: 0, refused: true, stage, code: "request-out-of-bounds",
reason}; nothing trains and nothing is spent (training happens only in an accepted masked
stage), and every later stage of that protocol run is refused until a new accepted setup. The
coordinator (server.secure_aggregation) counts such a site as a dropout. In a simulation,
and for a site that does not require secure aggregation, the researcher's run config and
the coordinator decide, as before.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.secure_aggregation import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.outbound import site_log
from client.site import SitePolicy, is_deployment
from fedslm.common.config import from_run_config
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.record import REJECTED, PrivacyRecord, Reason

SECURE_RECORD = "secure"  # in clear: whether the site's update is in the sum, and why not
GUARD_RECORD = "fedslm_secagg_bounds"  # context state: what this site accepted in the current protocol run
REFUSED = "refused"  # the guard's stage after a refusal: every later stage is refused until a new setup
OUT_OF_BOUNDS = Reason.OUT_OF_BOUNDS.value  # the refusal's code on the wire


def requested(msg: Message) -> bool:
    """A SecAgg+ stage message (the coordinator's ``server.secure-aggregation``)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def masked_train(msg: Message, context: Context, train_clear) -> Message:
    """Answer one SecAgg+ stage; the masked stage trains with ``train_clear`` (client.app).

    A site that requires secure aggregation first checks the stage against its own bounds
    (``out_of_bounds``) and refuses it without running Flower's mod when it is out of them.
    """
    policy = bounding_policy(context)
    if policy is None:
        return secaggplus_mod(msg, context, lambda m, ctxt: bounded(m, ctxt, train_clear(m, ctxt)))
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    stage = stage if stage in Stage.all() else "unknown"
    guard = context.state.config_records.get(GUARD_RECORD) or ConfigRecord({"stage": ""})
    why = out_of_bounds(stage, configs, guard, msg.metadata.dst_node_id, policy.min_secure_cohort)
    if why is not None:
        context.state.config_records[GUARD_RECORD] = ConfigRecord({"stage": REFUSED})
        return refusal(msg, policy, stage, why)
    reply = secaggplus_mod(msg, context, lambda m, ctxt: bounded(m, ctxt, train_clear(m, ctxt)))
    context.state.config_records[GUARD_RECORD] = accepted(stage, configs, guard)
    return reply


def bounding_policy(context: Context) -> SitePolicy | None:
    """The policy of a deployed site that requires secure aggregation (it bounds the protocol), else None."""
    if not is_deployment(context.node_config):
        return None
    policy = SitePolicy.from_node_config(context.node_config)
    return policy if policy.require_secure_aggregation else None


def _ints(value) -> list[int] | None:
    """``value`` as a list of node ids, or None when it is anything else."""
    if not isinstance(value, list) or any(type(v) is not int for v in value):  # bool is no node id
        return None
    return value


def _int(value) -> int | None:
    return value if type(value) is int else None


def out_of_bounds(stage: str, configs: ConfigRecord, guard: ConfigRecord, me: int, min_cohort: int) -> str | None:
    """Why this stage of the coordinator's SecAgg+ must not run on this site, or None (module docstring)."""
    if stage == Stage.SETUP:
        shares, threshold = _int(configs.get(Key.SHARE_NUMBER)), _int(configs.get(Key.THRESHOLD))
        if shares is None or threshold is None:
            return "share_num and threshold must be integers"
        if shares < min_cohort:
            return (f"share_num {shares}: fewer than min-secure-cohort {min_cohort} sites would share keys with "
                    "this one")
        if not shares < 2 * threshold:
            return (f"threshold {threshold} of {shares} shares is not more than half: a coordinator could rebuild "
                    "both of this site's secrets from two halves of the holders")
        if threshold > shares:
            return f"threshold {threshold} exceeds share_num {shares}"
        return None
    if stage == "unknown":
        return "not a SecAgg+ stage"
    order = Stage.all()
    expected = order[order.index(stage) - 1]
    if guard.get("stage") != expected:
        return f"stage {stage} after {guard.get('stage') or 'nothing'}; expected it after {expected}"
    shares, threshold = int(guard["share_num"]), int(guard["threshold"])
    needed = max(min_cohort, threshold)
    bound = f"{'min-secure-cohort' if needed == min_cohort else 'the threshold'} {needed}"
    if stage == Stage.SHARE_KEYS:
        listed = [key for key in configs if key != Key.STAGE]
        if any(not key.isdigit() for key in listed):
            return "the public keys must be listed by node id"
        if str(me) not in listed:
            return "this site's own public keys are not among those listed"
        if len(listed) < needed:
            return f"{len(listed)} sites share keys with this one (itself included), fewer than {bound}"
        if len(listed) > shares:
            return f"{len(listed)} public keys listed, more than the {shares} shares announced at setup"
        return None
    if stage == Stage.COLLECT_MASKED_VECTORS:
        sources, ciphertexts = _ints(configs.get(Key.SOURCE_LIST)), configs.get(Key.CIPHERTEXT_LIST)
        if sources is None or not isinstance(ciphertexts, list) or len(ciphertexts) != len(sources):
            return "the forwarded shares must be a list of node ids and one ciphertext each"
        if len(set(sources)) != len(sources) or not set(sources) <= set(guard["neighbours"]) - {me}:
            return "the forwarded shares come from sites that did not share keys with this one, or twice"
        if len(sources) + 1 < needed:
            return (f"shares forwarded from {len(sources)} sites: this one would be masked among "
                    f"{len(sources) + 1}, fewer than {bound}")
        return None
    active, dead = _ints(configs.get(Key.ACTIVE_NODE_ID_LIST)), _ints(configs.get(Key.DEAD_NODE_ID_LIST))
    if active is None or dead is None:
        return "the active and dropped-out sites must be lists of node ids"
    if len(set(active)) != len(active) or len(set(dead)) != len(dead) or set(active) & set(dead):
        return "a site listed twice, or both active and dropped out (that would reveal both of its secrets)"
    if me in dead:
        return "this site is called dropped out while it answers"
    if not set(active) | set(dead) <= set(guard["sources"]) | {me}:
        return "a site listed that did not share keys with this one"
    if len(active) < threshold:
        return f"{len(active)} active sites, fewer than the threshold {threshold}"
    return None


def accepted(stage: str, configs: ConfigRecord, guard: ConfigRecord) -> ConfigRecord:
    """The guard after Flower's mod answered ``stage``: what later stages are checked against."""
    if stage == Stage.SETUP:
        return ConfigRecord({"stage": stage, "share_num": int(configs[Key.SHARE_NUMBER]),
                             "threshold": int(configs[Key.THRESHOLD]), "neighbours": [], "sources": []})
    state = ConfigRecord({**dict(guard), "stage": stage})
    if stage == Stage.SHARE_KEYS:
        state["neighbours"] = sorted(int(key) for key in configs if key != Key.STAGE)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        state["sources"] = sorted(int(src) for src in configs[Key.SOURCE_LIST])
    return state


def refusal(msg: Message, policy: SitePolicy, stage: str, why: str) -> Message:
    """The reply to a stage out of the site's bounds: no keys, shares or masked vector; a reason code in clear.

    The detail (the coordinator's own numbers against the site's bounds) goes to the site's log,
    as every refusal's does (client.outbound).
    """
    site_log(policy.name, f"refused a secure-aggregation stage ({OUT_OF_BOUNDS}): secure aggregation {stage}: {why}")
    sentence = Reason.OUT_OF_BOUNDS.sentence
    record = PrivacyRecord(client=policy.name, status=REJECTED, code=OUT_OF_BOUNDS, reason=sentence)
    return Message(RecordDict({
        "privacy": ConfigRecord(record.to_config()),
        "metrics": MetricRecord({"num-examples": 0}),
        SECURE_RECORD: ConfigRecord({"contributed": False, "weight": 0, "refused": True, "stage": stage,
                                     "code": OUT_OF_BOUNDS, "reason": sentence}),
    }), reply_to=msg)


def bounded(msg: Message, context: Context, reply: Message) -> Message:
    """``reply`` with the legacy fit result the mod masks: the checked B, or zeros with weight 0."""
    from slm.lora import from_arrays  # torch and peft, loaded by the round that just trained (client.app)

    expected = from_arrays(msg.content["arrays"])  # what the coordinator sent: names, shapes
    protocol = context.state.config_records[RECORD_KEY_STATE]
    privacy = reply.content["privacy"]
    if privacy.get("status") in ("refused", "rejected"):
        state, why = None, f"the site {privacy['status']} the round"
    else:
        bound = RunConfig.parse(from_run_config(context.run_config)).server.max_update_norm
        state = from_arrays(reply.content["arrays"])
        why = problem(state, expected, bound, float(protocol["clipping_range"]))
    weight = 0
    if why is None:
        weight = min(int(reply.content["metrics"]["num-examples"]), int(protocol["max_weight"]))
        vectors = [state[name].double().numpy() for name in sorted(expected)]
    else:
        vectors = [np.zeros(tuple(expected[name].shape)) for name in sorted(expected)]
    reply.content[SECURE_RECORD] = ConfigRecord({"contributed": why is None, "weight": weight,
                                                 "reason": why or ""})
    reply.content["fitres.parameters"] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(vectors), True)
    reply.content["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    reply.content["fitres.metrics"] = ConfigRecord({})
    reply.content["fitres.status"] = ConfigRecord({"code": 0, "message": ""})
    return reply


def problem(state: dict, expected: dict, max_norm: float, clipping_range: float) -> str | None:
    """Why this update must not be masked (what server.validate checks on a clear reply), or None."""
    if set(state) != set(expected):
        return "its tensors differ from the adapter it was sent"
    squared = 0.0
    for name, sent in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(sent.shape):
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(sent.shape)}"
        if not bool(got.isfinite().all()):
            return f"{name}: non-finite values"
        if float(got.abs().max()) > clipping_range:
            return f"{name}: a value beyond the secure aggregation's clipping range {clipping_range:g}"
        squared += float(((got.double() - sent.double()) ** 2).sum())
    if max_norm > 0 and math.sqrt(squared) > max_norm:
        return f"update norm {math.sqrt(squared):.4g} exceeds server.max-update-norm {max_norm:g}"
    return None
