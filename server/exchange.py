"""Send a round's messages and wait for the replies, saying every 30 s who is still working.

Flower's ``Grid.send_and_receive`` pushes the messages, then pulls replies until all are in or
the timeout passes, silently: a deployment's coordinator showed nothing for minutes while
hospitals trained. This is the same loop (push, then pull what has arrived, then sleep), with a
line at least every ``PROGRESS_EVERY`` seconds while replies are missing. Grids without
push/pull (the test doubles) are asked through ``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY = 30.0  # seconds between "still waiting" lines
PULL_EVERY = 1.0  # seconds between pulls (Flower's HTTP grid: 3; in memory: its pull_interval)


def send_and_receive(grid, messages: list, *, timeout: float, what: str, say: Callable[[str], None]) -> list:
    """The replies to ``messages`` that arrive within ``timeout`` seconds; ``say`` gets the progress lines."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    total, replies = len(pending), []
    started = time.monotonic()
    next_line = started + PROGRESS_EVERY
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        now = time.monotonic()
        if not pending or now - started >= timeout:
            break
        if now >= next_line:
            say(f"{what}: {total - len(pending)} of {total} sites replied; waiting ({now - started:.0f}s of "
                f"{timeout:.0f}s)")
            next_line = now + PROGRESS_EVERY
        time.sleep(min(PULL_EVERY, max(0.0, started + timeout - now)))
    return replies
