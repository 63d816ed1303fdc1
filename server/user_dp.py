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

Randomness, and why it is never saved: the cohort and the noise both come from one
``privacy.mechanism.randomness.DpRandom`` per server process, a ChaCha20 keystream keyed by
256 bits of OS entropy (a cryptographic generator: neither a cohort nor released noise
tells anything about the draws to come).

- Cohorts are never derived from ``server.seed``: the amplification by sampling assumes
  nobody can tell whether a given client was in the round; a seed written to config.json
  would let anyone recompute every cohort.
- The key is never written to the checkpoint nor restored from one: a resumed run that
  replayed the noise of a redone round would release two adapters whose difference is
  the noise-free update. ``server.noise-seed`` >= 0 derives the key from the seed instead
  (debugging only: NOT private against whoever knows the seed), mixed with the number of
  rounds already counted, so even then a resumed run does not replay earlier noise.

What the round record holds: the mechanism's parameters (S, z, q, eligible clients, delta),
the user-level epsilon and the cohort's size (the coordinator's secret material, as the
report says). Nothing computed from the cohort's updates: not even the share of clipped
updates, an un-noised statistic of the sampled clients' data that reports used to publish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.randomness import DpRandom, round_key


@dataclass(frozen=True)
class UserDpSpec:
    clip_norm: float  # S
    noise_multiplier: float  # z
    sample_rate: float  # q, per client per round
    delta: float

    @classmethod
    def of(cls, specs: RunConfig, num_clients: int) -> "UserDpSpec | None":
        user = specs.user_dp
        if not user.enabled:
            return None
        delta = user.delta or min(1e-5, 0.1 / max(num_clients, 1))
        spec = cls(clip_norm=user.clip_norm, noise_multiplier=user.noise_multiplier,
                   sample_rate=specs.server.fraction_train, delta=delta)
        if spec.clip_norm <= 0 or spec.noise_multiplier < 0 or not 0 < spec.sample_rate <= 1:
            from fedslm.common.errors import UserError

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
               eligible: int, rng: DpRandom) -> dict[str, torch.Tensor]:
    """sum(clipped) / (q N) + N(0, (z S / (q N))^2), per coordinate."""
    expected = spec.sample_rate * eligible
    std = spec.noise_multiplier * spec.clip_norm / expected
    out = {}
    for name, ref in reference.items():
        total = sum((c[name] for c in clipped), torch.zeros(ref.shape, dtype=torch.float64))
        noise = torch.from_numpy(rng.normal(ref.shape, std))  # float64
        out[name] = total / expected + noise
    return out


def poisson_cohort(nodes: list, sample_rate: float, rng: DpRandom) -> list:
    """Each node independently with probability q: the sampling the accountant composes."""
    return [n for n, chosen in zip(nodes, rng.bernoulli(len(nodes), sample_rate)) if chosen]


def server_random(noise_seed: int, counted: int) -> DpRandom:
    """This process's cohorts and noise: fresh OS entropy, or (debugging) the seed and ``counted``.

    ``counted`` is the number of user-level rounds already accounted when the process
    starts; mixing it into a debugging seed keeps a resumed run from replaying the noise
    of the process before it.
    """
    return DpRandom(round_key(noise_seed, "server-user-dp", counted))


def private_round(server_round: int, states: list[dict[str, torch.Tensor]], sent: dict[str, torch.Tensor],
                  spec: UserDpSpec, eligible: int, rng: DpRandom,
                  events: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """One DP-FedAvg step: the noised new tensors and the round's user-level record.

    The round's event is appended to ``events`` here, together with the draw: from this
    point the release is counted, whatever happens to it afterwards.
    """
    clipped = [clip_update({k: s[k] - sent[k] for k in sent}, spec.clip_norm)[0] for s in states]
    delta = noisy_mean(clipped, sent, spec, eligible, rng)
    events.append(spec.event().to_dict())
    eps = epsilon([SgmEvent(**e) for e in events], delta=spec.delta)
    record = {"round": server_round, "clip_norm": spec.clip_norm, "noise_multiplier": spec.noise_multiplier,
              "sample_rate": spec.sample_rate, "eligible": eligible, "cohort": len(states),
              "delta": spec.delta, "epsilon": eps, "accountant": "prv", "sampling": "poisson"}
    return {k: (sent[k].double() + delta[k]).to(sent[k].dtype) for k in sent}, record


class UserLevelStep:
    """User-level DP as a step of the round: whom it samples (Poisson, from ChaCha20) and what it releases.

    ``events``: the server state's counted user-level rounds (appended to at each draw);
    ``records``: the privacy view's user-level records. The generator is keyed on first use
    (``server_random``: from the rounds counted when this process starts), never saved.
    """

    def __init__(self, spec: UserDpSpec, noise_seed: int, events: list[dict], records: list[dict]):
        self.spec, self.noise_seed, self.events, self.records = spec, noise_seed, events, records
        self._random: DpRandom | None = None

    @property
    def random(self) -> DpRandom:
        if self._random is None:
            self._random = server_random(self.noise_seed, len(self.events))
        return self._random

    def sample(self, ordered: list) -> list:
        return poisson_cohort(ordered, self.spec.sample_rate, self.random)

    def release(self, server_round: int, outcome, states: list[dict[str, torch.Tensor]],
                sent: dict[str, torch.Tensor], eligible: int) -> None:
        """The noised mean into ``outcome`` (a RoundOutcome), with the cohort's size only; counted here."""
        outcome.cohort = len(states)
        outcome.update, outcome.user_dp = private_round(server_round, states, sent, self.spec, eligible,
                                                        self.random, self.events)
        self.records.append(outcome.user_dp)

    def line(self, outcome) -> str:
        record = outcome.user_dp
        expected = record["sample_rate"] * record["eligible"]
        return (f"user-level DP over {outcome.cohort} clients (expected {expected:.1f}), user-level eps "
                f"{record['epsilon']:.3f} at delta {record['delta']:.2g}")
