"""Reply intake: one round's replies sorted into failures, duplicate names and usable replies.

The coordinator knows a site only by the name it reports (the privacy record's "client"
in a training reply, the info's "client" in an evaluation reply). That name orders the
sampling, keys the privacy view and the "exhausted" set (one refusal stops sampling the
name) and the per-site evaluation entry. Two nodes reporting the same name — deployed
sites left without a node-config ``name`` all call themselves client-0 — would share all
of it: one refusal would stop every one of them, their privacy records would merge, one
evaluation entry would stand for all. Their replies cannot be told apart, so every reply
under a name that several nodes reported in one round is rejected ("duplicate site name
'X' (N nodes)"), and the name stays ambiguous for the rest of the run: a later lone
reply under it could come from either node, so it is rejected too, and those nodes are no
longer sampled for training (each would spend its privacy budget for a rejected update).

A training reply's privacy record is kept before its update is judged (a refusal and
every reported spend count whatever the tensors are); the update is then checked by
server.validate before it can touch the global adapter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.validate import Rejected, validate_update
from slm.lora import from_arrays


@dataclass
class Intake:
    usable: list[tuple[int, str, object]] = field(default_factory=list)  # (node, name, reply), names unique
    failed: list[tuple[int, str]] = field(default_factory=list)  # (node, reason): error replies and silences
    duplicate: list[tuple[int, str, str]] = field(default_factory=list)  # (node, name, reason)


@dataclass
class Update:
    """A valid training reply."""

    name: str
    state: dict[str, torch.Tensor]
    norm: float
    metrics: dict
    privacy: dict


@dataclass
class Training:
    updates: list[Update] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def check_training(usable, sent: dict[str, torch.Tensor], max_norm: float,
                   record: Callable[[str, dict], None]) -> Training:
    """The usable training replies: each privacy record to ``record``, then refusal or update checks."""
    out = Training()
    for _, name, reply in usable:
        if "privacy" not in reply.content or "metrics" not in reply.content:
            out.rejected.append((name, "no privacy record or metrics in the reply"))
            continue
        privacy, metrics = dict(reply.content["privacy"]), dict(reply.content["metrics"])
        record(name, privacy)
        if privacy.get("status") in ("refused", "rejected"):  # out of budget, or the site declined the request
            out.refused.append((name, privacy.get("reason", "")))
            continue
        try:
            if "arrays" not in reply.content:
                raise Rejected("no adapter tensors in the reply")
            state = from_arrays(reply.content["arrays"])
            norm = validate_update(state, sent, max_norm)
        except Rejected as why:
            out.rejected.append((name, str(why)))
            continue
        out.updates.append(Update(name, state, norm, metrics, privacy))
    return out


def check_secure_training(usable, record: Callable[[str, dict], None]) -> Training:
    """Replies of a secure round: privacy records and counts in clear, the updates only in the masked sum.

    The server cannot validate a masked update; the site checked its own before masking
    (client.secure_aggregation) and says in clear whether it is in the sum, and why not.
    An update counts with no state and no norm: the server never sees either.
    """
    out = Training()
    for _, name, reply in usable:
        if any(key not in reply.content for key in ("privacy", "metrics", "secure")):
            out.rejected.append((name, "no privacy record, metrics or secure-aggregation record in the reply"))
            continue
        privacy, metrics, secure = (dict(reply.content[key]) for key in ("privacy", "metrics", "secure"))
        record(name, privacy)
        if privacy.get("status") in ("refused", "rejected"):
            out.refused.append((name, privacy.get("reason", "")))
        elif not secure.get("contributed"):
            out.rejected.append((name, f"withheld by the site: {secure.get('reason', '')}"))
        else:
            out.updates.append(Update(name, {}, float("nan"), metrics, privacy))
    return out


# deploy/app_guard.py's refusal names the site by its node config: a site that refused every
# app has sent nothing else, and would otherwise stay node-<id> in every line and the report.
REFUSED_BY_SITE = re.compile(r"is not approved by site '([^'\n]{1,120})'(?:'>)?$")  # Flower: <class ...>:<'...'>


class Names:
    """Node id -> the name it reported, and the names that several nodes reported."""

    def __init__(self):
        self.of: dict[int, str] = {}
        self.ambiguous: dict[str, set[int]] = {}

    def __call__(self, node: int) -> str:
        return self.of.get(node, f"node-{node}")

    def is_ambiguous(self, node: int) -> bool:
        return node in self.of and self.of[node] in self.ambiguous

    def take_in(self, replies, name_of: Callable[[object], str | None], asked=(), timeout: float = 0.0) -> Intake:
        """Sort ``replies``; nodes in ``asked`` that did not reply are failures."""
        intake = Intake()
        replied = {r.metadata.src_node_id for r in replies}
        intake.failed += [(node, f"no reply within {timeout:g}s") for node in sorted(set(asked) - replied)]
        named = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = last_line(reply.error.reason)
                refused_by = REFUSED_BY_SITE.search(reason)
                if refused_by and node not in self.of:  # a name from a reply with content wins
                    self.of[node] = refused_by.group(1)
                intake.failed.append((node, reason))
                continue
            name = name_of(reply) or self(node)  # a reply without a name keeps the node's
            self.of[node] = name
            named.append((node, name, reply))
        counts = Counter(name for _, name, _ in named)
        for node, name, _ in named:
            if counts[name] > 1:
                self.ambiguous.setdefault(name, set()).add(node)
        for node, name, reply in named:
            if name in self.ambiguous:
                nodes = len(self.ambiguous[name] | {node})
                intake.duplicate.append((node, name, f"duplicate site name '{name}' ({nodes} nodes)"))
            else:
                intake.usable.append((node, name, reply))
        return intake


def last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
