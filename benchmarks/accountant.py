"""What a site's accounting costs per round: the cached RDP curves against Opacus' stock accountants.

Per round a site calibrates sigma against what is left of its budget (calibrate.noise_for_budget,
its last sigma as the guess), then reserves the round: PRV epsilon and the RDP cross-check of its
history with the round (ledger.reserve). That sequence is timed over a run's rounds for each
plan below, twice per accountant:

- ``one process``: every round in the same process (a simulated site: one Ray worker keeps its
  interpreter), so the curves of earlier rounds are reused;
- ``fresh process``: the cache emptied before every round (a deployed site runs each message in
  a fresh flwr-clientapp process);

and ``stock``: the same code on Opacus' own accountants, every RDP curve recomputed where Opacus
computes it (privacy.mechanism.accountant before the cache). The two must give the same sigmas
and epsilons to the last bit; the table says whether they did.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from benchmarks.measure import table
from privacy.mechanism import accountant
from privacy.mechanism.accountant import SgmEvent, epsilon
from privacy.mechanism.calibrate import noise_for_budget

# (what, sample rate, steps per round, rounds, budget): the plans the product's runs make
PLANS = (
    ("tiny scenario (2 sites x 64 records)", 8 / 64, 3, 2, 8.0),
    ("hospital demo (225 records)", 8 / 225, 5, 3, 8.0),
    ("long run (1000 records, 20 rounds)", 16 / 1000, 20, 20, 8.0),
)
DELTA = 1e-5


@contextmanager
def stock_opacus():
    """privacy.mechanism.accountant as it was: no cached curve, PRV sizing its grid from its own RDP run."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    saved = accountant._curve, accountant._prv, accountant._rdp

    def prv(history, delta, plan):
        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta, eps_error=plan[0]))

    def rdp(history, delta):
        acc = RDPAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta, alphas=accountant.RDP_ORDERS))

    accountant._curve, accountant._prv, accountant._rdp = accountant._curve.__wrapped__, prv, rdp
    try:
        yield
    finally:
        accountant._curve, accountant._prv, accountant._rdp = saved


def site_rounds(q: float, steps: int, rounds: int, budget: float, fresh: bool) -> tuple[list[float], list]:
    """Seconds per round, and the (sigma, epsilon, rdp epsilon) the site decided each round."""
    past, guess, seconds, decided = [], None, [], []
    for k in range(rounds):
        if fresh:
            accountant._curve.cache_clear()
        started = time.perf_counter()
        sigma = noise_for_budget(past, budget=budget, sample_rate=q, steps_per_round=steps, rounds_left=rounds - k,
                                 delta=DELTA, guess=guess)
        history = [*past, SgmEvent(sigma, q, steps)]
        eps, eps_rdp = epsilon(history, delta=DELTA), epsilon(history, delta=DELTA, accountant="rdp")
        seconds.append(time.perf_counter() - started)
        decided.append((sigma, eps, eps_rdp))
        past, guess = history, sigma
    return seconds, decided


def run(plans=PLANS) -> dict:
    epsilon([SgmEvent(1.0, 0.01, 1)], delta=DELTA)  # imports and Opacus' first-call set-up, outside the timings
    rows, results = [], []
    for what, q, steps, rounds, budget in plans:
        timed = {}
        for name, fresh in (("one process", False), ("fresh process", True)):
            accountant._curve.cache_clear()
            timed[name] = site_rounds(q, steps, rounds, budget, fresh)
        with stock_opacus():
            timed["stock"] = site_rounds(q, steps, rounds, budget, fresh=False)
        same = timed["stock"][1] == timed["one process"][1] == timed["fresh process"][1]
        total = {name: sum(seconds) for name, (seconds, _) in timed.items()}
        rows.append([what, rounds, total["stock"], total["fresh process"], total["one process"],
                     total["stock"] / total["fresh process"], total["stock"] / total["one process"],
                     "yes" if same else "NO"])
        results.append({"plan": what, "sample_rate": q, "steps": steps, "rounds": rounds, "budget": budget,
                        "seconds": total, "same_answers": same,
                        "sigmas": [sigma for sigma, _, _ in timed["one process"][1]]})
    print(table(["plan", "rounds", "stock s", "fresh process s", "one process s", "x (fresh)", "x (one process)",
                 "same sigmas and epsilons"], rows))
    return {"plans": results}
