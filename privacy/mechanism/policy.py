"""The client's budget policy: local rules win over what the server asks.

The server may request a noise multiplier (or a target epsilon to calibrate for). The
client computes the smallest sigma that lets every planned remaining round fit in what is
left of its budget (its own ``max_epsilon``, or the server's target if that is lower) and
trains with max(requested, required). If no sigma up to the client's own
``max_noise_multiplier`` fits, the round is refused ("budget exhausted"), a normal reply,
not an error. Why a cap: the last crumbs of a budget always admit SOME round, at absurd
noise (eps 0.9995 of 1 still fits 6 steps at sigma 15 by PRV), and such an update is pure
noise that the server would average into everyone's model. The default 5 means, at an
expected batch of 8, noise of std 0.6 C per coordinate on the averaged gradient.

A round that would show each record to the model more than ``MAX_PARTICIPATIONS`` times on
average (steps x q, i.e. local epochs) is refused before any accounting: DP-SGD rounds take a
few epochs at most, and the accounting of such requests is what a coordinator would use to
exhaust the site's time and memory (the accountant bounds each evaluation as well).
"""

from __future__ import annotations

from dataclasses import dataclass

from privacy.mechanism.calibrate import SIGMA_MIN, noise_for_budget, planned_epsilon
from privacy.mechanism.ledger import Ledger

MAX_PARTICIPATIONS = 100.0  # expected times one round shows each record: steps x q, i.e. local epochs


def default_delta(records: int) -> float:
    """min(1e-5, 0.1 / records).

    delta bounds the probability of a catastrophic leak; summed over all N records of the
    client it stays <= 0.1, i.e. delta is at least 10x below 1/N, and never looser than the
    customary 1e-5 (dp-notes: delta = 1/len(dataloader) as in Opacus' tutorial is far too large).
    """
    return min(1e-5, 0.1 / max(records, 1))


@dataclass(frozen=True)
class Decision:
    """What the client will do this round."""

    noise_multiplier: float | None  # None = refused
    planned_epsilon: float  # epsilon after all planned rounds at this sigma (when refused: spent so far)
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.noise_multiplier is None


def decide(ledger: Ledger, *, max_epsilon: float, requested_sigma: float, target_epsilon: float,
           sample_rate: float, steps: int, rounds_left: int, max_noise_multiplier: float = 5.0,
           max_participations: float = MAX_PARTICIPATIONS) -> Decision:
    """Choose sigma for this round from the local budget and the server's request.

    ``target_epsilon`` (the server's wish, 0 = none) can only lower the budget below
    ``max_epsilon``; the noise is calibrated to that budget over ``rounds_left`` rounds
    (this one included), assuming the client takes part in every remaining round. A
    requested sigma that already fits is taken as it is (one accountant evaluation);
    otherwise the least sigma that fits is searched from last round's sigma. A round of more
    than ``max_participations`` expected passes over the records is refused unaccounted.
    """
    if not steps * sample_rate <= max_participations:
        spent = ledger.spent()
        return Decision(None, spent, reason=(
            f"{steps} steps at sample rate {sample_rate:.4g} would show each record {steps * sample_rate:.4g} times "
            f"on average in one round; this site allows at most {max_participations:g}"))
    past = ledger.spent_events()
    budget = min(max_epsilon, target_epsilon) if target_epsilon > 0 else max_epsilon
    common = dict(sample_rate=sample_rate, steps_per_round=steps, delta=ledger.delta)
    # A request below SIGMA_MIN is never evaluated as it is: PRV at sigma 0.01-0.05 takes minutes and
    # tens of GiB (measured: OOM-killed at 24 GiB), a denial of service any coordinator could send. The
    # calibration below never goes under SIGMA_MIN, so such a request gets the calibrated sigma.
    if SIGMA_MIN <= requested_sigma <= max_noise_multiplier:
        planned = planned_epsilon(past, requested_sigma, rounds_left=rounds_left, budget=budget, **common)
        if planned <= budget:
            return Decision(requested_sigma, planned)
    required = noise_for_budget(past, budget=budget, rounds_left=rounds_left, sigma_max=max_noise_multiplier,
                                guess=past[-1].noise_multiplier if past else None, **common)
    if required is None:
        spent = ledger.spent()
        return Decision(None, spent, reason=(
            f"budget exhausted: spent {spent:.3f} of {budget:g}; {rounds_left} more round(s) would need "
            f"sigma > {max_noise_multiplier:g}"))
    sigma = max(requested_sigma, required)  # a request above the cap is still more noise: honoured
    return Decision(sigma, planned_epsilon(past, sigma, rounds_left=rounds_left, **common))
