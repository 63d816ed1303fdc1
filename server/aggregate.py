"""Aggregation of client adapters: three ways to combine LoRA updates.

A LoRA module contributes the update scale * B A (B: out x r, A: r x in). Averaging the
factors separately is NOT averaging the updates:

    mean_i(B_i) mean_i(A_i) != mean_i(B_i A_i)      (cross terms B_i A_j, i != j)

- ``fedavg`` (``average_lora_factors``): A and B averaged separately, weighted by examples.
  The common baseline; inexact whenever clients' A factors differ.
- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024, arXiv:2403.12313): every party derives the
  same A from the shared seed and freezes it; clients train and send only B. Then
  mean_i(B_i) A = mean_i(B_i A): exact, linear (so compatible with secure aggregation and
  with server-side DP noise), and half the traffic. The default when DP is on.
- ``svd`` (``average_lora_products``, as in FlexLoRA / FLoRA): the weighted mean of the
  products B_i A_i, re-factorized to rank r by truncated SVD. Exact up to rank r, but the
  server must see each client's factors (no secure aggregation).
"""

from __future__ import annotations

import torch

from fedslm.common.vocabulary import AGGREGATIONS


def _normalized(weights: list[float]) -> list[float]:
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"invalid weights {weights}")
    total = float(sum(weights))
    return [w / total for w in weights]


def average_lora_factors(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of every tensor separately (FedAvg over the adapter tensors)."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per client state")
    shares = _normalized(weights)
    return {
        name: sum(state[name].double() * share for state, share in zip(states, shares)).to(states[0][name].dtype)
        for name in states[0]
    }


def lora_pairs(names) -> list[tuple[str, str]]:
    """(A key, B key) per adapted module, from PEFT's state-dict names."""
    pairs = []
    for name in sorted(names):
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise ValueError(f"{name} has no matching lora_B tensor")
            pairs.append((name, partner))
    return pairs


def average_lora_products(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of B_i A_i per module, re-factorized to the clients' rank by truncated SVD.

    With M = U S V^T (singular values descending), B = U_r S_r^1/2 and A = S_r^1/2 V_r^T, so
    B A is the best rank-r approximation of M (Eckart-Young); if the mean has rank <= r
    it is reproduced exactly.
    """
    shares = _normalized(weights)
    out = {}
    for a_key, b_key in lora_pairs(set(states[0])):
        rank = states[0][a_key].shape[0]
        mean = sum(s[b_key].double() @ s[a_key].double() * w for s, w in zip(states, shares))  # (out, in)
        u, sv, vh = torch.linalg.svd(mean, full_matrices=False)
        root = sv[:rank].sqrt()
        out[b_key] = (u[:, :rank] * root).to(states[0][b_key].dtype)  # (out, r)
        out[a_key] = (root[:, None] * vh[:rank]).to(states[0][a_key].dtype)  # (r, in)
    return out


def aggregate(kind: str, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Combine the tensors the clients sent (for ffa: B only; A is shared and fixed)."""
    if kind in ("fedavg", "ffa"):
        return average_lora_factors(states, weights)
    if kind == "svd":
        return average_lora_products(states, weights)
    raise ValueError(f"unknown aggregation {kind!r}; use one of {AGGREGATIONS}")
