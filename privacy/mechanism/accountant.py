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

What a PRV evaluation may cost is bounded, because a coordinator chooses sigma, q and the
steps it plans: PRV discretises the privacy loss on a grid whose half-width is an RDP
epsilon at delta/4000 and whose mesh shrinks with sqrt(steps), and it holds one density per
distinct (sigma, q) on it (measured: sigma 0.3, q 0.5, 1000 steps, a grid of 6.4e7 points,
went past 4.5 GB; the coordinator's 10^5 steps would need 6e10). So before PRV runs, the
cheap RDP bound and the grid are computed (``prv_eps_error``), and ``epsilon`` answers with
the RDP accountant's value instead of PRV's when

- the RDP epsilon exceeds ``EPSILON_CEILING`` (no budget means anything there), or, given the
  budget it will be compared with, exceeds ``BEYOND_BUDGET`` times it plus ``BEYOND_SLACK``
  (PRV and RDP differ by 10-25% where epsilon is large, and at most by a few units where it is
  small: such a history does not fit whichever accountant answers), or
- PRV's grid would exceed ``PRV_MAX_GRID`` points (its memory) or ``PRV_MAX_CELLS`` points x
  distinct mechanisms (its time) even with its error widened from 0.01 to ``PRV_MAX_EPS_ERROR``
  (in between, PRV runs at the widened error: its upper end, still a bound, at most that much
  above the usual answer).

The RDP value is an upper bound on epsilon, as PRV's upper end is, so a budget enforced with
either holds; the fallback is looser (it may refuse a round PRV would admit: the safe side).
Histories below these bounds get PRV's answer exactly as before: every single-event history
in tests/privacy/mechanism (grids of 4e4-8e5 points), and a ledger of 20 rounds at distinct
sigmas plus its plan (9e5 points x 21 mechanisms: 16 s, 0.9 GB). The bounds are on the work,
not on the clock: the same events give the same work, hence the same epsilon, on every
machine, which the ledger and the reports (privacy/report/reconcile.py recomputes every
stored epsilon) rely on. "The same" is to the last bit within one installation; another
NumPy/SciPy build moves PRV's answer in its last digits (measured across two machines,
NumPy 2.4.6/SciPy 1.17.1 and 2.5.2/1.18.1: at most 2e-9 relative, RDP values and every
calibrated sigma identical; BENCHMARKS.md 19), far inside the report's tolerance of 1e-3.

What one evaluation costs in time is mostly RDP curves, not PRV's convolution (measured on
a site's first calibration: 74% of its ClientApp's time was Opacus' RDP series). A curve at
one (sigma, q) never changes and composes by multiplication (Mironov 2017, Prop. 1), so it
is computed once per process (``_curve``) and shared by the fallback checks, PRV's grid and
the RDP accountant; PRV is then run with the grid half-width already computed, the value
Opacus' ``compute_safe_domain_size`` would compute again from the same curves. Every answer
is bit-identical to Opacus' own accountants on the same history (tests/privacy/mechanism).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

ACCOUNTANTS = ("prv", "rdp")
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 1025, 8))
_RDP_ORDERS = tuple(RDP_ORDERS)  # the cache's key (privacy.mechanism.accountant._curve)
EPSILON_CEILING = 1000.0  # an RDP epsilon above this is answered by RDP: exp(1000) bounds nothing anyway
BEYOND_BUDGET, BEYOND_SLACK = 4.0, 4.0  # RDP above 4 x budget + 4: does not fit, PRV not asked
PRV_EPS_ERROR = 0.01  # PRV's error as Opacus defaults it: what every normal history gets
PRV_MAX_EPS_ERROR = 0.1  # the widest error PRV may be run with to fit its grid
PRV_MAX_GRID = 4 * 10**6  # PRV's grid points: ~0.7 GB (measured: 7.5e6 points, 1.2 GB over the baseline)
PRV_MAX_CELLS = 2 * 10**7  # grid points x distinct (sigma, q): ~20 s on one core (measured: ~1 s per 1e6)


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


def epsilon(events: Iterable[SgmEvent], *, delta: float, accountant: str = "prv",
            budget: float | None = None) -> float:
    """(eps, delta)-DP epsilon of the composition of ``events``; 0 for none, inf without noise.

    ``accountant="prv"`` answers with PRV, or with the RDP accountant's value (also an upper
    bound) where PRV would be pointless or too dear (see the module's docstring); ``budget``,
    when the caller only compares the answer with it, lets far-over-budget histories skip PRV.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    history = history_of(events)
    if (trivial := trivial_epsilon(history, delta)) is not None:
        return trivial
    history = _merged(history)
    # Opacus warns "optimal order is the largest alpha" when an RDP bound (RDP itself, or
    # the RDP tail bound PRV uses to size its grid) could be tighter; both stay valid bounds.
    # At q = 1 (a DP evaluation: the plain Gaussian) PRV's subsampling formula takes log(1 - q)
    # = log 0 in a branch np.where then discards: a RuntimeWarning, not a wrong value
    # (tests/privacy/mechanism: q = 1 against dp_accounting's PLD).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "prv" and (plan := _prv_plan(history, delta, budget)) is not None:
            return _prv(history, delta, plan)
        return _rdp(history, delta)


def prv_eps_error(history: list[tuple[float, float, int]], delta: float, *,
                  budget: float | None = None) -> float | None:
    """The error PRV runs with on a merged ``history``; None when the RDP value answers instead."""
    plan = _prv_plan(history, delta, budget)
    return plan and plan[0]


def _prv_plan(history: list[tuple[float, float, int]], delta: float,
              budget: float | None) -> tuple[float, float] | None:
    """(PRV's error, its grid's tail bound) for a merged ``history``; None when the RDP value answers instead.

    Costs one RDP curve at Opacus' default orders per distinct (sigma, q) (cached), from
    which both the ceiling checks and PRV's grid (as opacus 1.6 PRVAccountant._get_domain
    sizes it: compute_safe_domain_size, then Domain.create_aligned) are computed without
    running PRV.
    """
    from opacus.accountants.analysis.prv import Domain

    orders = _default_orders()
    per_step = [_curve(sigma, q, orders) for sigma, q, _ in history]
    total = sum(rdp * steps for rdp, (_, _, steps) in zip(per_step, history))
    rough = _spent(orders, total, delta)  # >= the RDP accountant's
    if not rough <= EPSILON_CEILING or (budget is not None and rough > BEYOND_BUDGET * budget + BEYOND_SLACK):
        return None
    delta_error, compositions = delta / 1000, sum(steps for _, _, steps in history)  # as Opacus' get_epsilon
    tail = max([_spent(orders, total, delta_error / 4)]
               + [_spent(orders, rdp, delta_error / (8 * compositions)) for rdp in per_step])
    if not math.isfinite(tail):
        return None

    def over(eps_error: float) -> float:  # how many times too large PRV's grid would be (<= 1: fine)
        half = _half_width(tail, eps_error)
        size = Domain.create_aligned(-half, half, _mesh(eps_error, delta_error, compositions)).size
        return max(size / PRV_MAX_GRID, size * len(history) / PRV_MAX_CELLS)

    if over(PRV_EPS_ERROR) <= 1:
        return PRV_EPS_ERROR, tail
    widened = PRV_EPS_ERROR * over(PRV_EPS_ERROR) * 1.01  # the grid shrinks as 1 / error
    return (widened, tail) if widened <= PRV_MAX_EPS_ERROR and over(widened) <= 1 else None


def _half_width(tail: float, eps_error: float) -> float:
    """opacus 1.6 compute_safe_domain_size: Gopi et al. 2021, remark 5.6, as their code has it."""
    return max(tail, eps_error) + 3


def _mesh(eps_error: float, delta_error: float, compositions: int) -> float:
    """opacus 1.6 PRVAccountant._get_domain's mesh: finer as the square root of the compositions."""
    return eps_error / math.sqrt(compositions * math.log(12 / delta_error) / 2)


def _prv(history: list[tuple[float, float, int]], delta: float, plan: tuple[float, float]) -> float:
    """Opacus' PRVAccountant on ``history``, its grid sized from the tail bound already computed."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    eps_error, tail = plan

    class Sized(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            half = _half_width(tail, eps_error)
            return Domain.create_aligned(-half, half, _mesh(eps_error, delta_error, sum(num_self_compositions)))

    acc = Sized()
    acc.history = history
    return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def _rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDPAccountant.get_epsilon, from the cached curves.

    Opacus' default orders stop at 63; low-noise, few-step histories need higher ones.
    """
    return _spent(_RDP_ORDERS, sum(_curve(sigma, q, _RDP_ORDERS) * steps for sigma, q, steps in history), delta)


@functools.lru_cache(maxsize=1024)  # at most ~2 MiB of curves (272 orders each)
def _curve(sigma: float, q: float, orders: tuple[float, ...]):
    """RDP of one step of the SGM at each order (opacus.accountants.analysis.rdp.compute_rdp); read-only."""
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    curve.flags.writeable = False
    return curve


def _spent(orders: tuple[float, ...], rdp, delta: float) -> float:
    """Epsilon at ``delta`` from an RDP curve (Balle et al. 2020, via Opacus' get_privacy_spent)."""
    from opacus.accountants.analysis import rdp as analysis

    return float(analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)[0])


@functools.cache
def _default_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Run-length merge of identical (sigma, q): the same mechanism, composed fewer times."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]
