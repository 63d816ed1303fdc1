"""The model a round works on: the site's base with the adapter the coordinator sent.

Shared by a train round (client.train_round) and an evaluation (client.evaluate_round). The
base is the site's own (node config model-dir, or the simulation's model.name); only the
adapter comes from the coordinator. Under FFA-LoRA the A factors are frozen and never sent
back, so the site checks that the coordinator's digest of them is its own before it trains
or evaluates on them.
"""

from __future__ import annotations

from flwr.app import Message

from client.outbound import Refused
from client.site import SitePolicy
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.record import Reason
from slm.allocator import return_freed_memory
from slm.base import resolve_device
from slm.lora import LoraSpec, a_factor_digest, adapter_state, attach, from_arrays, set_adapter_state


def received_model(specs: RunConfig, policy: SitePolicy, msg: Message, aggregation: str):
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
