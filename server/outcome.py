"""What one training round did: typed while the round runs, one metrics.jsonl row when it is recorded.

Why typed: the row was a dict that the clear path, the secure path and user-level DP each
added keys to, and user-level DP deleted one from afterwards (who took part is what its
amplification hides). Here each field is declared once and ``row`` decides what is
written: under user-level DP the cohort's size, never its members.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundOutcome:
    sampled: int
    participants: list[dict] = field(default_factory=list)  # {"client", "update_norm"?, metrics...}
    refused: list[dict] = field(default_factory=list)  # {"client"?, "reason"} (no client under user-level DP)
    failed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    update: dict | None = None  # the aggregated tensors to apply (the sent ones); None: nothing trained
    skipped: bool = False  # too few valid replies, or a secure sum that failed
    train_loss: float | None = None  # without DP only: the replies' weighted train loss
    cohort: int | None = None  # user-level DP: the cohort's size (participants are then never written)
    user_dp: dict | None = None  # user-level DP: the round's record (server.user_dp.private_round)
    secure_aggregation: dict | None = None  # a SecAgg+ round's protocol facts

    def skip(self) -> "RoundOutcome":
        self.skipped, self.update = True, None
        return self

    def row(self) -> dict:
        """The metrics.jsonl row (evaluation and timing are added by the round loop)."""
        row: dict = {"sampled": self.sampled}
        if self.cohort is None:
            row["participants"] = self.participants
        row.update(refused=self.refused, failed=self.failed, rejected=self.rejected, bytes_up=self.bytes_up,
                   bytes_down=self.bytes_down)
        optional = {"cohort": self.cohort, "user_dp": self.user_dp, "train_loss": self.train_loss,
                    "secure_aggregation": self.secure_aggregation, "skipped": self.skipped or None}
        row.update({k: v for k, v in optional.items() if v is not None})
        return row
