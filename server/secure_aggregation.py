"""Secure aggregation of FFA-LoRA updates: the coordinator learns the sum, never one site's B.

With FFA-LoRA (server.aggregate) the global B is the example-weighted mean of the sites'
B factors, a plain weighted sum: exactly what SecAgg+ computes (Bonawitz et al., CCS 2017;
Bell et al., CCS 2020). Each site masks its quantized vector with pairwise masks (agreed by
Diffie-Hellman with every neighbour) and a private mask; the masks cancel in the sum, and
the masks of a site that drops out after sharing keys are rebuilt from Shamir shares held
by the others.

Why Flower's ``SecAggPlusWorkflow`` as it is, and not the stages re-driven by hand: the
protocol's bookkeeping (who holds whose shares, which secret to reveal for an active or a
dropped neighbour, the offset of the quantized sum) is where a re-implementation goes
wrong, and the workflow is Flower's own, reviewed code. It is legacy-only, so it is given
what it needs and nothing more: a ``LegacyContext`` whose strategy (``_OneRound``) hands it
the cohort our round loop sampled and keeps the unmasked mean; a subclass that puts our
train request (adapter + round config, exactly what a clear round sends) into the stage
that trains; and a grid wrapper (``_Recording``) that keeps the masked stage's replies,
whose privacy records and counts stay in clear. The site side is Flower's ``secaggplus_mod``
around our own train handler (client.secure_aggregation).

Parameters (Flower's defaults, except the quantization range): values are clipped to
[-8, 8] (CLIPPING_RANGE; sites withhold a B outside it instead of letting it be clipped)
and each site's vector n_i/W * B_i is quantized to QUANTIZATION_RANGE levels, masked
mod 2^32. The quantization range is the largest power of two with cohort * range < 2^32,
so the integer sum cannot wrap (2^29 for 4 sites, 128x finer than Flower's 2^22). W
(max_weight) is the largest record count reported in clear so far (65,536 before any): a
site's weight is min(records, W), so the mean equals the clear example-weighted mean
whenever no site grew past W since. The error per value is below cohort * 2 * 8 / range /
sum(n_i / W) (stochastic rounding, one step per site; ``error_bound``).

The threshold is 3/4 of the cohort (at least 2, always more than half): up to a quarter of
the cohort may drop out after sharing keys; fewer survivors and the round is skipped, never
corrupted. More than half, so that a coordinator claiming a live site dropped cannot
collect both its private-mask shares and its key shares (each site reveals one of the two).
Every site shares keys with the whole cohort (num_shares 1.0: share_num = cohort).

A deployed site that requires secure aggregation checks those numbers itself
(client.secure_aggregation: share_num at least its min-secure-cohort, threshold more than
half) and refuses a stage out of its bounds with a reply that carries no SecAgg+ record.
``_Recording`` hands Flower's workflow such a reply (any reply without one) as an error:
the site is a dropout in SecAgg+ terms. A site that leaves before sharing its keys (refused
or failed at setup or share keys) was never part of the sum: ``_TrainingRound`` forgets it
(Bonawitz et al.'s U1 and U2), where Flower's workflow would wait for shares of its secrets
that nobody holds and halt the round. The others are summed if the threshold still holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig

CLIPPING_RANGE = 8.0  # Flower's default; sites withhold any |B| above it (client.secure_aggregation)
MODULUS = 2**32  # Flower's default and its documented maximum
FIRST_MAX_WEIGHT = 2**16  # W before any record count was reported
RECONSTRUCTION = 0.75  # share of the cohort needed to unmask: > 1/2, tolerates a quarter dropping out


def check_config(specs: RunConfig) -> None:
    """Secure aggregation sums B factors: only FFA-LoRA's exact linear mean is such a sum."""
    if not specs.server.secure_aggregation:
        return
    aggregation = specs.server.aggregation
    if aggregation != "ffa":
        raise UserError(f"server.secure-aggregation needs server.aggregation ffa (got {aggregation}): fedavg and svd "
                        "need each site's A and B factors, which a masked sum does not give")
    if specs.user_dp.enabled:
        raise UserError("server.secure-aggregation does not work with user-dp.enabled yet: user-level DP clips each "
                        "site's update on the server, which then never sees one")


def quantization_range(cohort: int) -> int:
    """The largest power of two with cohort * range < MODULUS: the quantized sum never wraps."""
    return MODULUS >> math.ceil(math.log2(cohort + 1))


def max_weight(records: list[int]) -> int:
    """W: the largest record count any site reported in clear so far, or FIRST_MAX_WEIGHT."""
    return max(records) if records else FIRST_MAX_WEIGHT


def error_bound(cohort: int, weights: list[float], weight_cap: float) -> float:
    """Largest deviation of one value of the secure mean from the clear weighted mean.

    Each contributing site's n_i/W * B_i is rounded stochastically to a step 2 * clip /
    range; dividing the sum by sum(n_i / W) scales the rounding; Flower quantizes the
    weights themselves to 1/range, a relative error of W / (n_i * range), negligible.
    """
    step = 2 * CLIPPING_RANGE / quantization_range(cohort)
    return len(weights) * step / (sum(weights) / weight_cap)


@dataclass
class SecureRound:
    """What the coordinator gets from one secure round."""

    mean: dict[str, torch.Tensor] | None  # the weighted mean B; None when the protocol halted
    replies: list = field(default_factory=list)  # the masked stage's replies: privacy records and counts in clear;
    # also the refusals of sites that left earlier (before sharing keys), so each sampled site is accounted for
    refusals: list = field(default_factory=list)  # every stage's refusals (client.secure_aggregation)
    messages: int = 0  # messages sent by the coordinator over the four stages
    bytes_down: int = 0
    bytes_up: int = 0
    threshold: int = 0


def secure_mean(grid, sampled: list[int], request: RecordDict, sent: dict[str, torch.Tensor],
                weight_cap: int, server_round: int, timeout: float) -> SecureRound:
    """Run Flower's SecAgg+ over ``sampled`` with ``request`` as the train message; unmask the mean."""
    cohort = len(sampled)
    recording = _Recording(grid)
    strategy = _OneRound(sampled, recording)
    workflow = _TrainingRound(request, num_shares=1.0, reconstruction_threshold=RECONSTRUCTION,
                              max_weight=float(weight_cap), clipping_range=CLIPPING_RANGE,
                              quantization_range=quantization_range(cohort), modulus_range=MODULUS,
                              timeout=timeout)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    workflow(recording, context)
    mean = None
    if strategy.mean is not None:
        names = sorted(sent)
        mean = {name: torch.from_numpy(np.asarray(array, dtype=np.float64)).reshape(sent[name].shape)
                .to(sent[name].dtype) for name, array in zip(names, strategy.mean)}
    answered = {r.metadata.src_node_id for r in recording.masked}
    early = [r for r in recording.refusals if r.metadata.src_node_id not in answered]
    return SecureRound(mean=mean, replies=recording.masked + early, refusals=recording.refusals,
                       messages=recording.messages,
                       bytes_down=recording.bytes_down, bytes_up=recording.bytes_up,
                       threshold=max(2, round(RECONSTRUCTION * cohort)))


def _bytes(content: RecordDict) -> int:
    """Payload bytes: arrays by their data, other records serialized (count_bytes fails on an empty string)."""
    return sum(record.count_bytes() if isinstance(record, ArrayRecord) else len(record.deflate())
               for record in content.values())


class _Recording:
    """The Grid, keeping the masked stage's replies and the refusals, counting every message and byte.

    Flower's workflow reads a SecAgg+ record from every reply without an error; a reply
    without one (a site refusing the stage, client.secure_aggregation) reaches it as an error,
    so that the site is a dropout, and is kept in ``refusals``.
    """

    def __init__(self, grid):
        self.grid, self.masked, self.refusals = grid, [], []
        self.messages = self.bytes_down = self.bytes_up = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stages = {m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for m in messages}
        self.messages += len(messages)
        self.bytes_down += sum(_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(_bytes(r.content) for r in replies if not r.has_error())
        if Stage.COLLECT_MASKED_VECTORS in stages:
            self.masked = replies
        sent = {m.metadata.dst_node_id: m for m in messages}
        return [self._dropout(reply, sent) for reply in replies]

    def _dropout(self, reply, sent: dict):
        """``reply``, or an error in its place when it carries no SecAgg+ record (the site refused the stage)."""
        if reply.has_error() or RECORD_KEY_CONFIGS in reply.content.config_records:
            return reply
        self.refusals.append(reply)
        secure = reply.content.config_records.get("secure") or {}
        reason = str(secure.get("reason", "no secure-aggregation record in the reply"))
        # an error reply from the node the stage's message went to (src_node_id: that message's dst_node_id)
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason),
                       reply_to=sent[reply.metadata.src_node_id])

    def __getattr__(self, name):
        return getattr(self.grid, name)


class _TrainingRound(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow; the stage that trains carries our train request."""

    def __init__(self, request: RecordDict, **kwargs):
        super().__init__(**kwargs)
        self.request = request

    def setup_stage(self, grid, context, state) -> bool:
        going_on = super().setup_stage(grid, context, state)
        _forget_absent(state)
        return going_on

    def share_keys_stage(self, grid, context, state) -> bool:
        going_on = super().share_keys_stage(grid, context, state)
        _forget_absent(state)
        return going_on

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        for content in state.nid_to_fitins.values():
            for key, record in self.request.items():
                content[key] = record
        return super().collect_masked_vectors_stage(grid, context, state)


def _forget_absent(state) -> None:
    """Sites that did not answer setup or share keys shared no keys: they leave the protocol.

    No site masked against them (each masks only against the sites whose shares reached it)
    and nobody holds shares of their secrets; Flower's workflow would still ask for those
    shares in the unmask stage and halt. After this the unmask stage's dropped-out sites are
    exactly those that shared keys and then sent no masked vector.
    """
    state.sampled_node_ids = set(state.active_node_ids)
    state.nid_to_neighbours = {nid: neighbours & state.active_node_ids
                               for nid, neighbours in state.nid_to_neighbours.items()
                               if nid in state.active_node_ids}


class _OneRound(Strategy):
    """The legacy strategy the workflow asks: our cohort in, the unmasked mean out."""

    def __init__(self, sampled: list[int], grid):
        self.sampled, self.grid, self.mean = sampled, grid, None

    def configure_fit(self, server_round, parameters, client_manager):
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(GridClientProxy(node, self.grid, 0), empty) for node in self.sampled]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # every result carries the same unmasked mean (Flower's legacy layout)
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
