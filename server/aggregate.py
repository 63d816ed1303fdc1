"""Aggregation of client adapters.

``average_lora_factors`` is FedAvg applied to the adapter tensors: A and B are averaged
separately, weighted by each client's example count. Note that this is not the average
of the updates B_i A_i (mean(B) mean(A) != mean(B A)); it is the common baseline.
"""

from __future__ import annotations

import torch


def average_lora_factors(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"invalid weights {weights}")
    total = float(sum(weights))
    return {
        name: sum(state[name].double() * (w / total) for state, w in zip(states, weights)).to(states[0][name].dtype)
        for name in states[0]
    }
