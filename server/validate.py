"""Check every client reply before it can touch the global adapter.

A reply is rejected (recorded with its reason, the round goes on with the others) unless
it has exactly the expected tensors, with the expected shapes and dtypes, all values
finite, and an update norm ||sent - global|| within the configured bound: a single NaN,
a wrong shape or a wildly scaled update would otherwise poison every client's model.
"""

from __future__ import annotations

import math

import torch


class Rejected(ValueError):
    """A reply that must not be aggregated; the message says why."""


def update_norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((state[k].double() - reference[k].double()) ** 2).sum()) for k in reference))


def validate_update(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_norm: float) -> float:
    """Return the update norm of a valid reply; raise Rejected otherwise."""
    missing, extra = set(reference) - set(state), set(state) - set(reference)
    if missing or extra:
        raise Rejected(f"unexpected tensors: missing {sorted(missing)[:2]}, extra {sorted(extra)[:2]}")
    for name, expected in reference.items():
        got = state[name]
        if tuple(got.shape) != tuple(expected.shape):
            raise Rejected(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype != expected.dtype:
            raise Rejected(f"{name}: dtype {got.dtype}, expected {expected.dtype}")
        if not torch.isfinite(got).all():
            raise Rejected(f"{name}: non-finite values")
    norm = update_norm(state, reference)
    if max_norm > 0 and norm > max_norm:
        raise Rejected(f"update norm {norm:.4g} exceeds server.max-update-norm {max_norm:g}")
    return norm
