"""The run's status as Flower records it: failed when fewer rounds trained than planned.

`flwr run` returns 0 whatever its ServerApp did (flwr 1.41), so the one place a coordinator's
tooling can read that a deployment trained nothing is the run's status (`flwr ls`:
``finished:completed`` or ``finished:failed``). Flower sets ``failed`` only when the ServerApp
raises; so, after the run directory, the report and the closing line are written, a run that
trained fewer rounds than planned (zero included) ends by raising ``PartialRun``.

Flower logs a raising ServerApp as a crash: "ServerApp raised an exception" with a traceback,
then "Exit Code: 200 ... An unhandled exception occurred". For ``PartialRun`` that would read
as a bug, so a filter on Flower's logger rewrites that record into one line saying what
happened and drops the exit-code record that follows it; every other exception is logged as
Flower logs it. `fedslm simulate` calls Flower's engine in-process and catches ``PartialRun``
(simulation/engine.py): it exits 3 from the run's own files.
"""

from __future__ import annotations

import logging

FLOWER_LOGGER = "flwr"  # flwr.common.logger.FLOWER_LOGGER's name


class PartialRun(Exception):
    """Fewer rounds trained than planned (the closing line above it said why)."""


def check_complete(trained: int, planned: int) -> None:
    """Raise ``PartialRun`` (Flower then records the run as failed) unless every planned round trained."""
    if trained < planned:
        raise PartialRun(f"{trained} of {planned} rounds trained")


class _PartialRunLines(logging.Filter):
    """Flower's crash report for a ``PartialRun`` as one line, without the traceback and the exit-code help."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PartialRun):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "[fedslm] run status: failed, %s (`flwr ls` shows it)", (error,), None, None)
            self.seen = True
            return True
        if self.seen and str(record.msg).startswith("Exit Code:"):
            self.seen = False
            return False
        return True


def quiet_partial_runs() -> None:
    """Install the filter once on Flower's logger (idempotent: the ServerApp module may be imported twice)."""
    logger = logging.getLogger(FLOWER_LOGGER)
    if not any(isinstance(f, _PartialRunLines) for f in logger.filters):
        logger.addFilter(_PartialRunLines())
