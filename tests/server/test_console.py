"""What a person sees on the console ([fedslm] lines), driven through the fake Grid (tests/server/conftest.py).

- every evaluation line carries the task's accuracy next to the eval loss, weighted and per client;
- a round that aggregated no update says why (its first error), and the end line counts the
  rounds that trained, not the rounds that ran.
"""

import pytest
from fake_grid import FakeGrid

from server.console import closing_line


def round_lines(capsys, prefix: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"[fedslm] {prefix}")]


def test_label_accuracy_is_shown_next_to_the_eval_loss(make_federation, capsys):
    accuracy = {1: 0.4, 2: 0.8}  # 5 records each: weighted 0.6
    grid = FakeGrid({n: (f"site-{n}", "ok") for n in accuracy}, eval_metrics=lambda n: {"accuracy": accuracy[n]})
    make_federation(grid, **{"server.rounds": 1}).run(resumed=False)
    lines = round_lines(capsys, "round ")
    assert "[fedslm] round 0: eval loss 2.0150, accuracy 60.0%  (site-1 2.0100 40.0%, site-2 2.0200 80.0%)" in lines
    assert any(line.startswith("[fedslm] round 1: eval loss 2.0150, accuracy 60.0%") for line in lines)


def test_next_word_top1_is_shown_and_many_clients_as_ranges(make_federation, capsys):
    grid = FakeGrid({n: (f"phone-{n}", "ok") for n in range(1, 11)},
                    eval_metrics=lambda n: {"top1_accuracy": n / 100, "top3_accuracy": n / 50})
    make_federation(grid, **{"server.rounds": 1}).run(resumed=False)
    assert ("[fedslm] round 0: eval loss 2.0550, top-1 5.5%  (10 clients, 2.0100 to 2.1000, top-1 1.0% to 10.0%)"
            in round_lines(capsys, "round 0"))


def test_a_round_where_every_client_failed_says_why_and_did_not_train(make_federation, capsys):
    grid = FakeGrid({n: (f"site-{n}", "crash") for n in (1, 2)})
    outcome = make_federation(grid, **{"server.rounds": 2}).run(resumed=False)
    assert outcome["rounds_completed"] == 2 and outcome["rounds_trained"] == 0
    lines = round_lines(capsys, "round ")
    for k in (1, 2):
        assert (f"[fedslm] round {k}: no usable update: 2 of 2 sampled failed, first: site-1 failed: "
                "RuntimeError: injected crash") in lines
    assert closing_line(outcome, 2) == ("done: 0 of 2 rounds trained (2 rounds had no usable update: every client "
                                        "failed or refused, or too few valid updates)")


def test_the_end_line_counts_the_rounds_that_trained(make_federation, capsys):
    grid = FakeGrid({1: ("site-1", "ok"), 2: ("site-2", "crash")})
    outcome = make_federation(grid, **{"server.rounds": 2}).run(resumed=False)
    assert outcome["rounds_trained"] == 2 and closing_line(outcome, 2) == "done: 2 of 2 rounds trained"
    assert not round_lines(capsys, "round 1: no usable update")


def test_user_level_dp_round_over_failures_only_trained_nothing_and_names_nobody(make_federation, capsys):
    grid = FakeGrid({n: (f"site-{n}", "crash") for n in (1, 2)})
    outcome = make_federation(grid, **{"server.rounds": 1, "server.fraction-train": 1.0, "user-dp.enabled": True,
                                       "user-dp.clip-norm": 1.0, "user-dp.noise-multiplier": 1.0}).run(resumed=False)
    assert outcome["rounds_trained"] == 0
    line = "[fedslm] round 1: no usable update: 2 of 2 sampled failed, first: a sampled client failed: RuntimeError"
    lines = round_lines(capsys, "round 1")
    assert any(x.startswith(line) for x in lines)
    assert not [x for x in lines if "site-" in x and "eval loss" not in x]  # evaluation: every client, fixed


def test_an_evaluation_without_a_usable_reply_says_so_in_words():
    from server.evaluation import describe

    summary = {"eval_loss": float("nan"), "eval_clients": {}, "eval_errors": ["site-3: RuntimeError"],
               "eval_refused": [{"client": "site-1", "reason": "budget"}, {"client": "site-2", "reason": "budget"}]}
    lines = describe(summary, "eval")
    assert lines[0] == "eval: no site evaluated: 2 refused, 1 failed" and not [x for x in lines if "nan" in x]
    assert "site-1 refused to evaluate: budget" in lines and "evaluation failed on site-3: RuntimeError" in lines


def test_run_files_are_strict_json_a_nan_eval_loss_is_null(tmp_path):
    import json
    import math

    from server.rundir import RunDir

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))

    rundir = RunDir.create(str(tmp_path), "run")
    rundir.append_metrics({"round": 0, "eval_loss": math.nan, "eval_clients": {}, "x": [math.inf]})
    rundir.log_event({"event": "stopped", "value": -math.inf})
    rundir.write_config({"a": math.nan})
    rundir.write_privacy_view({"clients": {"s": [{"epsilon": math.inf}]}})
    assert strict((tmp_path / "run" / "metrics.jsonl").read_text()) == {
        "round": 0, "eval_loss": None, "eval_clients": {}, "x": [None]}
    assert strict((tmp_path / "run" / "events.jsonl").read_text())["value"] is None
    assert strict((tmp_path / "run" / "config.json").read_text()) == {"a": None}
    assert strict((tmp_path / "run" / "privacy" / "ledger.json").read_text())["clients"]["s"][0]["epsilon"] is None
