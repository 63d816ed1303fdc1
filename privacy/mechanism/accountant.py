"""Epsilon of a client's DP-SGD history, always recomputed from the stored events.

Mechanism: every local DP-SGD step is one Poisson-subsampled Gaussian mechanism (SGM)
with noise multiplier sigma and sample rate q = expected batch / records, applied to
per-example gradients clipped to C. Sample-level (eps, delta)-DP of a client composes
EVERY step of EVERY round and run it took part in; no amplification is claimed from the
server's client selection, because the client knows it was selected.

Accountants:
- ``prv`` (reported): privacy random variables, Gopi, Lee & Wutschitz, "Numerical
  Composition of Differential Privacy", NeurIPS 2021, through Opacus' PRVAccountant,
  which returns the upper end of its error interval (eps_error=0.01).
- ``rdp`` (cross-check, 10-25% looser): Renyi DP of the SGM, Mironov, Talwar & Zhang,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019, converted with
  Balle et al. 2020 as implemented by Opacus' RDPAccountant.
GDP is deliberately absent: its CLT approximation underestimates epsilon.

Both are checked in tests against Google's dp_accounting PLD accountant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

ACCOUNTANTS = ("prv", "rdp")
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 1025, 8))


@dataclass(frozen=True)
class SgmEvent:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism. Never changes meaning."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self):
        if self.noise_multiplier < 0 or not 0 <= self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(f"invalid SGM event {self}")

    def to_dict(self) -> dict:
        return asdict(self)


def history_of(events: Iterable[SgmEvent]) -> list[tuple[float, float, int]]:
    """(sigma, q, steps) of the events that release anything (no steps or q = 0: nothing released)."""
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0 and e.sample_rate > 0]


def trivial_epsilon(history: list[tuple[float, float, int]], delta: float) -> float | None:
    """0 for an empty history, inf when any step had no noise; None when an accountant must compute it."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return None


def epsilon(events: Iterable[SgmEvent], *, delta: float, accountant: str = "prv") -> float:
    """(eps, delta)-DP epsilon of the composition of ``events``; 0 for none, inf without noise."""
    history = history_of(events)
    if (trivial := trivial_epsilon(history, delta)) is not None:
        return trivial
    # Opacus warns "optimal order is the largest alpha" when an RDP bound (RDP itself, or
    # the RDP tail bound PRV uses to size its grid) could be tighter; both stay valid bounds.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "prv":
            from opacus.accountants import PRVAccountant

            acc = PRVAccountant()
            acc.history = _merged(history)
            return float(acc.get_epsilon(delta=delta, eps_error=0.01))
        if accountant == "rdp":
            from opacus.accountants import RDPAccountant

            acc = RDPAccountant()
            acc.history = _merged(history)
            # Opacus' default orders stop at 63; low-noise, few-step histories need higher ones.
            return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Run-length merge of identical (sigma, q): the same mechanism, composed fewer times."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]
