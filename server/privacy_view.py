"""What the server learns of each site's privacy spend: the privacy records sites report, round by round.

Kept in the checkpoint and written to the run directory (privacy/ledger.json) every round;
a site that refuses (its budget) is "exhausted" and no longer sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrivacyView:
    """What the server learns of each client's privacy spend (as reported by the client)."""

    clients: dict[str, list[dict]] = field(default_factory=dict)
    user_level: list[dict] = field(default_factory=list)
    exhausted: set[str] = field(default_factory=set)

    def record(self, server_round: int, name: str, fields: dict) -> None:
        self.clients.setdefault(name, []).append({"round": server_round, **fields})
        if fields.get("status") == "refused":
            self.exhausted.add(name)

    def to_dict(self) -> dict:
        return {"clients": self.clients, "user_level": self.user_level, "exhausted": sorted(self.exhausted)}

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyView":
        return cls(clients=data.get("clients", {}), user_level=data.get("user_level", []),
                   exhausted=set(data.get("exhausted", [])))
