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
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.client.mod.secure_aggregation import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from slm.config import from_run_config
from slm.lora import from_arrays

SECURE_RECORD = "secure"  # in clear: whether the site's update is in the sum, and why not


def requested(msg: Message) -> bool:
    """A SecAgg+ stage message (the coordinator's ``server.secure-aggregation``)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def masked_train(msg: Message, context: Context, train_clear) -> Message:
    """Answer one SecAgg+ stage; the masked stage trains with ``train_clear`` (client.app)."""
    return secaggplus_mod(msg, context, lambda stage_msg, ctxt: bounded(stage_msg, ctxt, train_clear(stage_msg, ctxt)))


def bounded(msg: Message, context: Context, reply: Message) -> Message:
    """``reply`` with the legacy fit result the mod masks: the checked B, or zeros with weight 0."""
    expected = from_arrays(msg.content["arrays"])  # what the coordinator sent: names, shapes
    protocol = context.state.config_records[RECORD_KEY_STATE]
    privacy = reply.content["privacy"]
    if privacy.get("status") in ("refused", "rejected"):
        state, why = None, f"the site {privacy['status']} the round"
    else:
        config = from_run_config(context.run_config)
        state = from_arrays(reply.content["arrays"])
        why = problem(state, expected, config["server.max-update-norm"], float(protocol["clipping_range"]))
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
