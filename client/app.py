"""The ClientApp: local DP-LoRA training and evaluation on data that never leaves the site.

Two inputs, two types (docs/THREAT-MODEL.md): the site's own policy (client.site: node
config in a deployment, the researcher's run config in a simulation) decides budget,
delta, records, ledger, noise and which columns a task may name; the coordinator's run
config and message are a request (client.request), parsed whole and bounded against that
policy before the site reads its records for it or touches its ledger.

Admitted, a message is worked on by its own room: a train round, a transaction that
reserves, trains, commits and only then replies (client.train_round), or an evaluation
(client.evaluate_round). Under DP nothing computed from training records leaves but the
DP-SGD output and its accounting: no train loss, no timing, no error text — every handler
is ``guarded`` (client.outbound): a deployed site replies to any failure with a reason code
only.

This module imports neither torch nor peft nor Opacus; those rooms do, and are imported only
for a message that reaches them. A deployed site runs every message in a fresh
``flwr-clientapp`` process; three of the four messages of a SecAgg+ round (setup, share
keys, unmask) train nothing, and a request refused at admission never builds the model.
Measured, the import alone took 3.5 s of CPU per message (a phone's battery, a site's queue).
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import secure_aggregation
from client.data import DataSpec, LocalData, load_local_data
from client.outbound import Refused, guarded, site_log
from client.request import Request, parse_evaluation, parse_round
from client.site import SitePolicy, is_deployment
from fedslm.common.config import request_config
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.record import REJECTED, PrivacyRecord, Reason
from slm.quiet import quiet_libraries

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


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    """A clear train round, or one stage of a secure one (client.secure_aggregation masks the reply)."""
    if secure_aggregation.requested(msg):
        return secure_aggregation.masked_train(msg, context, lambda m, c: train_clear(m, c, masked=True))
    return train_clear(msg, context)


def train_clear(msg: Message, context: Context, masked: bool = False) -> Message:
    """Train one round; ``masked``: the reply goes through SecAgg+ (client.secure_aggregation), not in clear."""
    policy, request, local = admitted(context, msg.content["config"], parse_round)
    from client.train_round import train_round  # torch, peft and Opacus: see this module's docstring

    return train_round(msg, policy, request, local, masked)


@app.evaluate("ship")
@guarded
def evaluate_shipped(msg: Message, context: Context) -> Message:
    """A shipped GGUF: verify its sha256, store it in the model dir, evaluate it here, reply metrics only."""
    policy, request, local = admitted(context, dict(msg.content["config"]), parse_evaluation)
    from client.evaluate_round import evaluate_shipment

    return evaluate_shipment(msg, policy, request, local)


@app.evaluate()
@guarded
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the site's held-out records (client.evaluation: what a deployed site allows)."""
    policy, request, local = admitted(context, msg.content["config"], parse_evaluation)
    from client.evaluate_round import evaluate_received

    return evaluate_received(msg, policy, request, local)
