"""The round settings the server reads from the run config, checked before any site is contacted."""

from __future__ import annotations

from dataclasses import dataclass

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
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
    def of(cls, specs: RunConfig) -> "RoundSpec":
        """Also rejects combinations that cannot work, before any client is contacted."""
        server = specs.server
        if specs.user_dp.enabled and server.aggregation == "svd":
            raise UserError("user-dp.enabled needs server.aggregation fedavg or ffa: svd re-factorizes each "
                            "client's product, which a clipped, noised mean of updates does not provide")
        if server.min_clients < 1 or server.rounds < 1:
            raise UserError("server.rounds and server.min-clients must be at least 1")
        check_config(specs)
        return cls(rounds=server.rounds, min_clients=server.min_clients, fraction_train=server.fraction_train,
                   timeout=server.timeout, aggregation=server.aggregation, secure=server.secure_aggregation,
                   max_update_norm=server.max_update_norm)
