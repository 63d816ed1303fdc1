"""A site's progress lines during long work: training steps and evaluated records.

A SmolLM2 evaluation of a 24-label task took minutes with nothing on the console; these
lines, in the console's plain style ("[fedslm] GARD: step 3/5", "[fedslm] GARD:
evaluated 32/111 records"), say that a site is working and how far it is. One line when
the work is done and one every ``every_s`` seconds before that, so a fast round adds two
lines per site and a slow one a line every 20 s.

Where they go decides what they reveal (docs/THREAT-MODEL.md):

- in a deployment, the site's own log (``client.outbound.site_log``: the SuperNode's stderr),
  never the coordinator's console;
- in a simulation, the researcher's console (stdout: Ray forwards a worker's stdout);
- in a simulation with user-level DP (``user-dp.enabled``), nowhere: a line naming the
  sites that train would reveal the round's cohort, which the user-level amplification by
  sampling assumes nobody can tell (the server's own lines give its size only).
"""

from __future__ import annotations

import time
from typing import Callable

from client.outbound import site_log
from client.site import SitePolicy


class Progress:
    """Throttled progress lines to ``say`` (None: quiet)."""

    def __init__(self, say: Callable[[str], None] | None, every_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic):
        self.say, self.every_s, self.clock = say, every_s, clock
        self.last = clock()

    def step(self, step: int, steps: int) -> None:
        """A training step is done (``client.train.train_adapter``'s ``on_step``)."""
        self._maybe(f"step {step}/{steps}", done=step >= steps)

    def evaluated(self, records: int, total: int) -> None:
        """Some held-out records are evaluated (``slm.evaluate.evaluate``'s ``on_progress``)."""
        self._maybe(f"evaluated {records}/{total} records", done=records >= total)

    def _maybe(self, text: str, done: bool) -> None:
        if self.say is None:
            return
        now = self.clock()
        if done or now - self.last >= self.every_s:
            self.say(text)
            self.last = now


def site_progress(policy: SitePolicy, user_dp: bool, log: Callable[[str], None]) -> Progress:
    """The progress lines of this site: to its own log, the researcher's console, or nowhere (see above);
    ``user_dp``: the run's user-dp.enabled."""
    if policy.deployment:
        return Progress(log)
    if user_dp:
        return Progress(None)
    return Progress(lambda text: print(f"[fedslm] {policy.name}: {text}", flush=True))


def site_note(policy: SitePolicy, text: str) -> None:
    """A line in a deployed site's own log. A simulated site keeps quiet: its console is the researcher's,
    where lines naming who trained would sit next to a user-level DP run's cohort-size-only lines."""
    if policy.deployment:
        site_log(policy.name, text)


def round_progress(policy: SitePolicy, specs) -> Progress:
    """This site's progress lines for a round of the run ``specs`` (a RunConfig)."""
    return site_progress(policy, specs.user_dp.enabled, lambda text: site_note(policy, text))
