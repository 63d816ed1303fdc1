"""What the coordinator asks of a site in one round: parsed, typed, and bounded by the site's policy.

Everything here comes from the coordinator (the run config and the message), so nothing
here is a setting: it is a request the site may refuse. ``problems`` returns the reasons a
request cannot be honoured as asked; the ClientApp refuses such a round with those reasons
in its reply and in the site's own log, and trains nothing. Round numbers only shape the
noise plan (how the remaining budget is spread); the budget itself is enforced by the
ledger's reservation (past + this round <= budget), whatever numbers arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.site import SitePolicy

AGGREGATIONS = ("fedavg", "ffa", "svd")


@dataclass(frozen=True)
class RoundRequest:
    """One train request, as sent (validated by ``problems``, never trusted)."""

    server_round: int
    num_rounds: int
    run_id: str
    aggregation: str
    local_steps: int
    batch_size: int
    lr: float
    clip_norm: float
    requested_sigma: float
    target_epsilon: float

    @classmethod
    def parse(cls, config: dict, round_cfg) -> "RoundRequest":
        """From the validated run config and the message's config record; unparseable = ValueError."""
        return cls(server_round=int(round_cfg["server-round"]), num_rounds=int(round_cfg["num-rounds"]),
                   run_id=str(round_cfg["run-id"]), aggregation=str(round_cfg["aggregation"]),
                   local_steps=config["train.local-steps"], batch_size=config["train.batch-size"],
                   lr=config["train.lr"], clip_norm=config["dp.clip-norm"],
                   requested_sigma=config["dp.noise-multiplier"], target_epsilon=config["dp.target-epsilon"])

    def problems(self, policy: SitePolicy, records: int) -> list[str]:
        """Why this request cannot be honoured by ``policy`` on ``records`` training records (empty = fine)."""
        found = []
        if not 1 <= self.server_round <= self.num_rounds:
            found.append(f"round {self.server_round} of {self.num_rounds} is not a round of the run")
        if self.num_rounds > policy.max_rounds:
            found.append(f"{self.num_rounds} planned rounds exceed the site's max-rounds {policy.max_rounds}")
        if not 1 <= self.local_steps <= policy.max_local_steps:
            found.append(f"{self.local_steps} local steps: the site allows 1 to {policy.max_local_steps}")
        if not 1 <= self.batch_size <= records:
            found.append(f"expected batch {self.batch_size}: the site has {records} training records")
        if not (math.isfinite(self.lr) and self.lr > 0):
            found.append(f"learning rate {self.lr!r} is not a positive number")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            found.append(f"clip norm {self.clip_norm!r} is not a positive number")
        if not (math.isfinite(self.requested_sigma) and self.requested_sigma >= 0):
            found.append(f"requested noise multiplier {self.requested_sigma!r} is not a number >= 0")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            found.append(f"target epsilon {self.target_epsilon!r} is not a number >= 0")
        if self.aggregation not in AGGREGATIONS:
            found.append(f"aggregation {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        if not self.run_id or len(self.run_id) > 200:
            found.append("run id is empty or longer than 200 characters")
        return found

    @property
    def rounds_left(self) -> int:
        """Rounds the noise plan spreads the remaining budget over (this one included); valid requests only."""
        return self.num_rounds - self.server_round + 1
