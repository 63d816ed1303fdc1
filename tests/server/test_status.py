"""A run that trained fewer rounds than planned ends failed in Flower's records, with one line, not a crash report."""

import logging

import pytest

from server.status import FLOWER_LOGGER, PartialRun, check_complete, quiet_partial_runs


def test_only_a_complete_run_passes():
    check_complete(2, 2)
    for trained in (0, 1):
        with pytest.raises(PartialRun, match=f"^{trained} of 2 rounds trained$"):
            check_complete(trained, 2)


def test_flowers_crash_report_of_a_partial_run_is_one_line_and_other_errors_keep_theirs(caplog):
    quiet_partial_runs()
    quiet_partial_runs()  # idempotent
    logger = logging.getLogger(FLOWER_LOGGER)
    assert sum(type(f).__name__ == "_PartialRunLines" for f in logger.filters) == 1
    caplog.set_level(logging.INFO, logger=FLOWER_LOGGER)
    for error in (PartialRun("0 of 2 rounds trained"), RuntimeError("boom")):
        try:
            raise error
        except Exception as ex:  # as flwr/superlink/runtime/run_serverapp.py logs it, then flwr_exit
            logger.error("%s raised an exception", "ServerApp", exc_info=ex)
            logger.error("Exit Code: 200\nAn unhandled exception occurred in the ServerApp.")
    partial, crash, crash_exit = caplog.records
    assert partial.getMessage() == "[fedslm] run status: failed, 0 of 2 rounds trained (`flwr ls` shows it)"
    assert partial.exc_info is None
    assert crash.getMessage() == "ServerApp raised an exception" and crash.exc_info[1].args == ("boom",)
    assert crash_exit.getMessage().startswith("Exit Code: 200")
