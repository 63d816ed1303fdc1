"""What the coordinator asks of a site: parsed, typed, and bounded by the site's policy, before anything else.

Everything here comes from the coordinator (the run config and the message), so nothing
here is a setting: it is a request the site may refuse. ``parse_round`` and
``parse_evaluation`` read ALL of it — the typed run config (unknown keys, types, ranges),
the round fields, the task's fields, verbalizers and template, the cross-field rules — and
return the request or the reasons it cannot be honoured. The ClientApp calls them before
it touches its records or its ledger: a request refused here trains nothing, spends
nothing and writes nothing (docs/THREAT-MODEL.md, "requests are checked before the
budget is reserved").

Round numbers only shape the noise plan (how the remaining budget is spread); the budget
itself is enforced by the ledger's reservation (past + this round <= budget), whatever
numbers arrive. The reasons are for the site's own log; what leaves a deployed site is the
``Reason.OUT_OF_BOUNDS`` sentence (client.outbound).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from client.site import SitePolicy
from fedslm.common.config import request_config
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import AGGREGATIONS, RANGES, SITE_OWNED, RunConfig
from slm.tasks import check_template, parse_verbalizers

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")  # it is written to the site's log and ledger
TASK_FIELDS = {"sft": ("prompt_field", "response_field"), "label": ("text_field", "label_field"),
               "next-word": ("text_field",)}  # the task concept's fields naming a column of the site's records


@dataclass(frozen=True)
class Request:
    """The parts of a train or evaluation request the site uses, as sent and then checked."""

    specs: RunConfig  # the coordinator's run config, typed and range-checked (fedslm.common.config)
    run_id: str
    server_round: int
    aggregation: str


@dataclass(frozen=True)
class RoundRequest(Request):
    """One train request."""

    num_rounds: int
    local_steps: int
    batch_size: int
    lr: float
    clip_norm: float
    requested_sigma: float
    target_epsilon: float

    @property
    def rounds_left(self) -> int:
        """Rounds the noise plan spreads the remaining budget over (this one included); valid requests only."""
        return self.num_rounds - self.server_round + 1


def parse_round(run_config, round_cfg, policy: SitePolicy) -> tuple[RoundRequest | None, list[str]]:
    """(the train request, []) or (None or the request, the reasons it cannot be honoured).

    The expected batch against the record count is the one check left for after the
    records are read (client.app), before the ledger.
    """
    specs, found = _typed(run_config)
    if specs is None:
        return None, found
    try:
        request = RoundRequest(
            specs=specs, run_id=str(round_cfg["run-id"]), server_round=int(round_cfg["server-round"]),
            aggregation=str(round_cfg["aggregation"]), num_rounds=int(round_cfg["num-rounds"]),
            local_steps=specs.train.local_steps, batch_size=specs.train.batch_size, lr=specs.train.lr,
            clip_norm=specs.dp.clip_norm, requested_sigma=specs.dp.noise_multiplier,
            target_epsilon=specs.dp.target_epsilon)
    except (KeyError, TypeError, ValueError) as err:
        return None, [f"malformed round fields ({type(err).__name__}: {err})"]
    found += _common(request, policy)
    found += _training(request, policy)
    return request, found


def parse_evaluation(run_config, round_cfg, policy: SitePolicy) -> tuple[Request | None, list[str]]:
    """(the evaluation request, []) or (None or the request, the reasons it cannot be honoured)."""
    specs, found = _typed(run_config)
    if specs is None:
        return None, found
    try:
        request = Request(specs=specs, run_id=str(round_cfg["run-id"]),
                          server_round=int(round_cfg["server-round"]), aggregation=str(round_cfg["aggregation"]))
    except (KeyError, TypeError, ValueError) as err:
        return None, [f"malformed round fields ({type(err).__name__}: {err})"]
    return request, _common(request, policy)


def _typed(run_config) -> tuple[RunConfig | None, list[str]]:
    """The run config typed (unknown keys, types, choices) and its numbers in their ranges."""
    try:
        config = request_config(run_config)
    except UserError as err:
        return None, [str(err)]
    found = [f"config key '{name}': must be {rule}, got {config[name]!r}"  # site-owned keys are ignored, not checked
             for name, rule in RANGES.items() if name not in SITE_OWNED and not rule.admits(config[name])]
    return RunConfig.parse(config), found


def _common(request: Request, policy: SitePolicy) -> list[str]:
    """What every request must satisfy: identity, aggregation, the task, the model's shape and numerics."""
    specs, found = request.specs, []
    task = specs.task
    if not RUN_ID.fullmatch(request.run_id):
        found.append("run id must be 1-128 letters, digits or . _ : + - (it goes into the site's log and ledger)")
    if request.aggregation not in AGGREGATIONS:
        found.append(f"aggregation {request.aggregation[:40]!r} is not one of {', '.join(AGGREGATIONS)}")
    kind = task.task
    columns = {getattr(task, name) for name in TASK_FIELDS[kind]}
    if policy.fields is not None:
        named = sorted(columns - set(policy.fields))
        if named:
            found.append(f"task field(s) {', '.join(map(repr, named))} are not among the columns the site allows "
                         "(node config fields)")
    if policy.person_field and policy.person_field in columns:
        found.append("a task field names the site's privacy unit column: whom a record is about never becomes "
                     "training text or a label")
    if kind == "label" and policy.deployment:
        found += _verbalizers(task.verbalizers, policy.verbalizers)
    try:
        check_template(kind, task.prompt_template)
    except UserError as err:
        found.append(str(err))
    if specs.model.window > policy.max_window:
        found.append(f"a window of {specs.model.window} tokens: the site allows at most {policy.max_window} (node "
                     "config max-window)")
    if not specs.lora.dropout <= policy.max_lora_dropout:
        found.append(f"LoRA dropout {specs.lora.dropout:g}: the site allows at most {policy.max_lora_dropout:g}")
    if specs.server.wire_dtype not in policy.wire_dtypes:
        found.append(f"wire dtype {specs.server.wire_dtype}: the site sends {', '.join(policy.wire_dtypes)}")
    if specs.train.grad_sample_mode == "ghost" and (specs.model.dtype != "float32" or specs.train.autocast != "none"):
        found.append("ghost clipping needs a float32 base without autocast: it recomputes the clipped sum in a "
                     "second backward pass, whose rounding lets a clipped gradient exceed the clip norm")
    return found


def _verbalizers(requested: str, approved: str) -> list[str]:
    if not approved:
        return ["label task: the site approves no label words (node config verbalizers)"]
    try:
        asked = set(parse_verbalizers(requested)) if requested.strip() else None
    except UserError as err:
        return [str(err)]
    if asked is not None and asked != set(parse_verbalizers(approved)):
        return ["label task: data.verbalizers differ from the words the site approved (node config verbalizers)"]
    return []


def _training(request: RoundRequest, policy: SitePolicy) -> list[str]:
    """The train request's numbers against the site's bounds."""
    found = []
    if not 1 <= request.server_round <= request.num_rounds:
        found.append(f"round {request.server_round} of {request.num_rounds} is not a round of the run")
    if request.num_rounds > policy.max_rounds:
        found.append(f"{request.num_rounds} planned rounds exceed the site's max-rounds {policy.max_rounds}")
    if not 1 <= request.local_steps <= policy.max_local_steps:
        found.append(f"{request.local_steps} local steps: the site allows 1 to {policy.max_local_steps}")
    if not (math.isfinite(request.lr) and 0 < request.lr <= policy.max_lr):
        found.append(f"learning rate {request.lr!r}: the site allows (0, {policy.max_lr:g}]")
    if not (math.isfinite(request.clip_norm) and policy.min_clip_norm <= request.clip_norm) or request.clip_norm <= 0:
        found.append(f"clip norm {request.clip_norm!r}: the site allows {policy.min_clip_norm:g} or more")
    if not (math.isfinite(request.requested_sigma) and request.requested_sigma >= 0):
        found.append(f"requested noise multiplier {request.requested_sigma!r} is not a number >= 0")
    if not (math.isfinite(request.target_epsilon) and request.target_epsilon >= 0):
        found.append(f"target epsilon {request.target_epsilon!r} is not a number >= 0")
    bound = request.specs.server.max_update_norm
    if not (math.isfinite(bound) and bound >= 0):
        found.append(f"update bound {bound!r} is not a number >= 0")
    if not policy.unit.record_level and request.specs.train.grad_sample_mode == "ghost":
        found.append("ghost clipping with a privacy unit: a unit's gradient is the mean of its records' gradients, "
                     "which ghost clipping never forms (use hooks or functorch)")
    return found
