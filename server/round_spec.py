"""The round settings the server reads from the run config, checked before any site is contacted."""

from __future__ import annotations

from dataclasses import dataclass

from fedslm.common.errors import UserError
from server.secure_aggregation import check_config


@dataclass(frozen=True)
class RoundSpec:
    rounds: int
    min_clients: int
    fraction_train: float
    timeout: float
    aggregation: str
    max_update_norm: float
    secure: bool = False  # server.secure-aggregation: the sites' B summed by SecAgg+ (server.secure_aggregation)

    @classmethod
    def from_config(cls, config: dict) -> "RoundSpec":
        """Also rejects combinations that cannot work, before any client is contacted."""
        aggregation = config["server.aggregation"]
        if config["user-dp.enabled"] and aggregation == "svd":
            raise UserError("user-dp.enabled needs server.aggregation fedavg or ffa: svd re-factorizes each "
                            "client's product, which a clipped, noised mean of updates does not provide")
        if config["server.min-clients"] < 1 or config["server.rounds"] < 1:
            raise UserError("server.rounds and server.min-clients must be at least 1")
        return cls(rounds=config["server.rounds"], min_clients=config["server.min-clients"],
                   fraction_train=config["server.fraction-train"], timeout=config["server.timeout"],
                   aggregation=aggregation, secure=_secure(config, aggregation),
                   max_update_norm=config["server.max-update-norm"])


def _secure(config: dict, aggregation: str) -> bool:
    check_config(config, aggregation)
    return bool(config["server.secure-aggregation"])
