"""The coordinator's wait for replies says who is still working, at least every PROGRESS_EVERY seconds."""

from types import SimpleNamespace

from server import exchange


class SlowGrid:
    """Push/pull like Flower's grids; site n replies after its n-th pull."""

    def __init__(self, delays: dict[int, int]):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        return [f"m{m}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.delays[int(i[1:])] == self.pulls]


def test_a_slow_round_prints_progress_and_returns_every_reply(monkeypatch):
    monkeypatch.setattr(exchange, "PROGRESS_EVERY", 0.02)
    monkeypatch.setattr(exchange, "PULL_EVERY", 0.01)
    lines = []
    replies = exchange.send_and_receive(SlowGrid({1: 1, 2: 6, 3: 12}), [1, 2, 3], timeout=60, what="round 1 training",
                                        say=lines.append)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert lines and all(line.startswith("round 1 training: ") and "of 3 sites replied; waiting" in line
                         for line in lines)
    assert "1 of 3 sites replied" in lines[0]


def test_the_timeout_ends_the_wait_with_the_replies_that_came():
    replies = exchange.send_and_receive(SlowGrid({1: 1, 2: 10**9}), [1, 2], timeout=0.05, what="round 1 training",
                                        say=lambda line: None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
