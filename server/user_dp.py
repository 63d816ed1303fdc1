"""User-level (whole-client) DP on the server: DP-FedAvg with fixed clipping.

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018: each round, sample every client independently with probability q
(Poisson), clip each sampled client's update to L2 norm S, sum, divide by the EXPECTED
cohort size q*N (a fixed denominator, so one client changes the mean by at most
S / (q N)), and add N(0, (z S / (q N))^2) to every coordinate. Each round is then one
Poisson-subsampled Gaussian mechanism with noise multiplier z and rate q over clients;
rounds compose in privacy.mechanism.accountant (PRV), giving user-level (eps, delta).

This protects a whole client's data in what the server RELEASES (the global adapter);
the server itself still sees each client's clipped update. Meaningful for many-client
federations (phones): for a few hospitals sampled every round (q = 1) epsilon is large.

Randomness: one explicit torch.Generator owned by the server, seeded from OS entropy
unless ``server.noise-seed`` is set (then anyone knowing the seed and the clean mean
could remove the noise), and saved in the checkpoint so a resumed run continues it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privacy.mechanism.accountant import SgmEvent


@dataclass(frozen=True)
class UserDpSpec:
    clip_norm: float  # S
    noise_multiplier: float  # z
    sample_rate: float  # q, per client per round
    delta: float

    @classmethod
    def from_config(cls, config: dict, num_clients: int) -> "UserDpSpec | None":
        if not config["user-dp.enabled"]:
            return None
        delta = config["user-dp.delta"] or min(1e-5, 0.1 / max(num_clients, 1))
        spec = cls(clip_norm=config["user-dp.clip-norm"], noise_multiplier=config["user-dp.noise-multiplier"],
                   sample_rate=config["server.fraction-train"], delta=delta)
        if spec.clip_norm <= 0 or spec.noise_multiplier < 0 or not 0 < spec.sample_rate <= 1:
            from slm.errors import UserError

            raise UserError("user-dp: clip-norm must be > 0, noise-multiplier >= 0, server.fraction-train in (0, 1]")
        return spec

    def event(self) -> SgmEvent:
        return SgmEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale one client's update to L2 norm <= clip_norm (all tensors as one vector)."""
    norm = math.sqrt(sum(float((u.double() ** 2).sum()) for u in update.values()))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.double() * factor for k, v in update.items()}, norm


def noisy_mean(clipped: list[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], spec: UserDpSpec,
               eligible: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """sum(clipped) / (q N) + N(0, (z S / (q N))^2), per coordinate."""
    expected = spec.sample_rate * eligible
    std = spec.noise_multiplier * spec.clip_norm / expected
    out = {}
    for name, ref in reference.items():
        total = sum((c[name] for c in clipped), torch.zeros(ref.shape, dtype=torch.float64))
        noise = torch.normal(0.0, std, size=tuple(ref.shape), generator=generator, dtype=torch.float64)
        out[name] = total / expected + noise
    return out
