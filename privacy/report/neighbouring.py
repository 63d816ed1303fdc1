"""Which pairs of datasets the stated epsilons compare, and the replace-one epsilon next to them.

Every epsilon fedslm reports (privacy.mechanism.accountant, PRV) is for ADD/REMOVE-ONE
neighbouring: D and D' differ by one record being present or absent. That is the relation
the accountants analyse (Poisson-subsampled Gaussian: Mironov, Talwar & Zhang, "Renyi
Differential Privacy of the Sampled Gaussian Mechanism", 2019; Gopi, Lee & Wutschitz,
NeurIPS 2021; Abadi et al., "Deep Learning with Differential Privacy", CCS 2016). It does
not hide how many records there are, and a site sends its record count in clear (for
weighting), so the guarantee is stated with that said: ``STATEMENT``.

REPLACE-ONE neighbouring (D' = D with one record swapped for another, same size) is what a
reader who assumes the record count is public may want. For one step of the Poisson-
subsampled Gaussian with noise multiplier sigma and rate q, the swapped record is in the
batch with probability q and its clipped gradient can move the sum by up to 2C, so the
dominating pair (in units of C) is

    P = (1-q) N(0, sigma^2) + q N(-1, sigma^2),   Q = (1-q) N(0, sigma^2) + q N(+1, sigma^2)

(Zhu, Dong & Wang, "Optimal Accounting of Differential Privacy via Characteristic
Function", AISTATS 2022: dominating pairs of Poisson subsampling under both relations;
Balle, Barthe & Gaboardi, "Privacy Amplification by Subsampling: Tight Analyses via
Couplings and Divergences", NeurIPS 2018). Google's dp_accounting
(0.6.0) implements exactly this pair as ``NeighboringRelation.REPLACE_ONE`` for a
``PoissonSampledDpEvent`` of a ``GaussianDpEvent`` (pld/privacy_loss_mechanism.py,
AdditiveNoisePrivacyLoss, REPLACE adjacency; pld/privacy_loss_distribution.py,
from_gaussian_mechanism) and composes it with privacy loss distributions (Doroshenko,
Ghazi, Kamath, Kumar & Manurangsi, "Connect the Dots: Tighter Discrete Approximations of
Privacy Loss Distributions", PETS 2022). With ``pessimistic_estimate`` (its default) every
discretisation rounds towards more loss, so the result is an upper bound; ``INTERVAL``
(1e-3) keeps a report of many clients fast and moves epsilon by about 1e-3.

For comparison, group privacy gives the cruder bound: replace-one = remove then add, two
add/remove steps, so (eps, delta) under add/remove implies (2 eps, 2 e^eps delta) under
replace-one (Vadhan, "The Complexity of Differential Privacy", 2017, Lemma 2.2, k = 2). The
PLD number above is tighter and is the one reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from privacy.mechanism.accountant import SgmEvent, history_of, trivial_epsilon

RELATION = "add/remove one record"
STATEMENT = "(ε, δ)-DP under add/remove-one-record neighbouring; the number of records is released in clear"
STATEMENT_ASCII = "(eps, delta)-DP under add/remove-one-record neighbouring; the number of records is released in clear"
REPLACE_ONE_METHOD = ("replace-one epsilon at the same delta: dp_accounting 0.6.0 PLD accountant, "
                      "NeighboringRelation.REPLACE_ONE, PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) per round, "
                      "pessimistic discretisation 1e-3 (an upper bound); dominating pair (1-q)N(0,σ²)+qN(∓1,σ²) "
                      "(Zhu, Dong & Wang, AISTATS 2022)")
INTERVAL = 1e-3


def epsilon_replace_one(events: Iterable[SgmEvent], *, delta: float) -> float:
    """Replace-one epsilon of a DP-SGD history at ``delta``; 0 for none, inf without noise."""
    history = history_of(events)
    if (trivial := trivial_epsilon(history, delta)) is not None:
        return trivial
    return _replace_one(tuple(history), delta)


@lru_cache(maxsize=None)
def _replace_one(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from dp_accounting import NeighboringRelation, dp_event, pld

    accountant = pld.PLDAccountant(NeighboringRelation.REPLACE_ONE, value_discretization_interval=INTERVAL)
    for sigma, q, steps in history:  # round by round, as the events were recorded
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


# ---- a person with g records under a record-level guarantee ---------------------------------------------
GROUP_INTERVAL = 1e-2  # group epsilons run to tens or hundreds: 1e-3 took 84 s at g = 28, 1e-2 11 s, same to 4 digits
GROUP_METHOD = ("group epsilon at the same delta: dp_accounting 0.6.0 PLD accountant, per step a mixture of "
                "Gaussians N(j, σ²) with j ~ Binomial(g, q) against N(0, σ²) (Ganesh, \"Tight Group-Level DP "
                "Guarantees for DP-SGD with Sampling via Mixture of Gaussians Mechanisms\", 2024), pessimistic "
                "discretisation 1e-2 (an upper bound)")


def epsilon_group(events: Iterable[SgmEvent], *, delta: float, group: int) -> float:
    """Epsilon at ``delta`` of a record-level DP-SGD history for a person with ``group`` records.

    Add/remove of the person's g records: in one Poisson-subsampled step each of them is in
    the batch with probability q, independently, and each moves the clipped sum by at most
    C, so the sum moves by at most jC with j ~ Binomial(g, q). The dominating pair is then
    N(0, σ²) against the mixture sum_j P(j) N(j, σ²) in units of C (Ganesh 2024, Theorem 3.1;
    vector to scalar: Choquette-Choo, Ganesh, Steinke & Thakurta, "Privacy Amplification for
    Matrix Mechanisms", ICLR 2024, Corollary 4.7), which dp_accounting's
    MixtureOfGaussiansDpEvent composes exactly. g = 1 is the record-level epsilon itself
    (checked against PRV in tests); the crude alternative, (g eps, g e^((g-1) eps) delta)
    group privacy (Vadhan 2017, Lemma 2.2), is far looser and never reported.
    """
    if group < 1:
        raise ValueError(f"group must be at least 1, got {group}")
    history = history_of(events)
    if (trivial := trivial_epsilon(history, delta)) is not None:
        return trivial
    return _group(tuple(history), delta, group)


@lru_cache(maxsize=None)
def _group(history: tuple[tuple[float, float, int], ...], delta: float, group: int) -> float:
    from math import comb

    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant(value_discretization_interval=GROUP_INTERVAL)
    for sigma, q, steps in history:
        probs = [comb(group, j) * q ** j * (1 - q) ** (group - j) for j in range(group + 1)]
        accountant.compose(dp_event.MixtureOfGaussiansDpEvent(sigma, list(range(group + 1)), probs), steps)
    return float(accountant.get_epsilon(delta))
