"""Reply intake: duplicate site names are rejected, never merged; failures and silences are recorded."""

import json

import pytest
from fake_grid import FakeGrid, reply

from server.intake import Names

DUPLICATE = "duplicate site name 'client-0' (2 nodes)"


def named(node, name):
    return reply(node, {"info": {"client": name}})


def by_info(r):
    return r.content["info"]["client"]


def test_two_nodes_with_one_name_are_both_rejected_and_the_name_stays_ambiguous():
    names = Names()
    intake = names.take_in([named(1, "client-0"), named(2, "client-0"), named(3, "GARD")], by_info)
    assert [(n, name) for n, name, _ in intake.usable] == [(3, "GARD")]
    assert intake.duplicate == [(1, "client-0", DUPLICATE), (2, "client-0", DUPLICATE)]
    assert names.is_ambiguous(1) and names.is_ambiguous(2) and not names.is_ambiguous(3)
    later = names.take_in([named(2, "client-0")], by_info)  # alone now, but it could be either node
    assert not later.usable and later.duplicate == [(2, "client-0", DUPLICATE)]


def test_errors_silences_and_unnamed_replies():
    names = Names()
    crashed = reply(7, {}, error="Traceback\n  ...\nRuntimeError: boom\n")
    intake = names.take_in([crashed, named(8, None)], by_info, asked=[7, 8, 9], timeout=30)
    assert intake.failed == [(9, "no reply within 30s"), (7, "RuntimeError: boom")]
    assert [(n, name) for n, name, _ in intake.usable] == [(8, "node-8")]  # a reply without a name keeps its node's


def test_a_site_refused_by_its_app_guard_is_named_by_the_refusal_unless_it_named_itself():
    names = Names()
    guard = ("<class 'deploy.app_guard.NotApproved'>:<'app 0123456789abcdef is not approved by site '{}''>")
    intake = names.take_in([reply(4, {}, error=guard.format("hospital-a")), reply(5, {}, error=guard.format("")),
                            reply(6, {}, error="RuntimeError: is not approved by site 'spoof'\nmore")], by_info)
    assert [names(node) for node, _ in intake.failed] == ["hospital-a", "node-5", "node-6"]
    names.take_in([named(4, "GARD")], by_info)  # a name the site reported with content wins from then on
    names.take_in([reply(4, {}, error=guard.format("other"))], by_info)
    assert names(4) == "GARD"


def test_a_federation_rejects_duplicate_names_in_training_and_evaluation(make_federation, capsys):
    """Unnamed deployed sites are all client-0: one refusal must not stop them all, nor one eval entry stand for all."""
    grid = FakeGrid({1: ("client-0", "ok"), 2: ("client-0", "refuse"), 3: ("GARD", "ok")})
    fed = make_federation(grid)
    row = fed.train(1, [1, 2, 3], eligible=3).row()
    assert row["rejected"] == [{"client": "client-0", "reason": DUPLICATE}] * 2
    assert [p["client"] for p in row["participants"]] == ["GARD"] and not row["refused"]
    assert "client-0" not in fed.view.clients and not fed.view.exhausted  # neither merged nor exhausted
    assert capsys.readouterr().out.count(f"round 1: client-0 rejected: {DUPLICATE}") == 2

    summary = fed.evaluate(1, [1, 2, 3])
    assert set(summary["eval_clients"]) == {"GARD"} and summary["eval_loss"] == pytest.approx(2.03)
    assert summary["eval_rejected"] == [{"client": "client-0", "reason": DUPLICATE}] * 2
    assert f"round 1: eval reply rejected: {DUPLICATE}" in capsys.readouterr().out


def test_ambiguous_sites_are_not_sampled_after_the_first_evaluation(make_federation):
    """Found at round 0's evaluation: they would spend budget on updates that are rejected anyway."""
    grid = FakeGrid({1: ("client-0", "ok"), 2: ("client-0", "ok"), 3: ("GARD", "ok")})
    fed = make_federation(grid, **{"server.rounds": 1})
    fed.run(resumed=False)
    assert [node for kind, node, _ in grid.sent if kind == "train"] == [3]
    rows = [json.loads(line) for line in (fed.rundir.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval_rejected"] == [{"client": "client-0", "reason": DUPLICATE}] * 2
    assert set(rows[1]["eval_clients"]) == {"GARD"}


def test_a_site_that_declines_the_request_is_listed_with_its_reason_but_not_exhausted(make_federation):
    grid = FakeGrid({1: ("GARD", "ok"), 2: ("GHR", "ok")})
    fed = make_federation(grid)
    original = grid.send_and_receive

    def declining(messages, timeout):
        replies = original(messages, timeout)
        for r in replies:
            if r.metadata.src_node_id == 2:
                r.content = {"privacy": {"client": "GHR", "status": "rejected", "reason": "lr 5 above the site's 0.1"},
                             "metrics": {"num-examples": 0}}
        return replies

    grid.send_and_receive = declining
    row = fed.train(1, [1, 2], eligible=2).row()
    assert row["refused"] == [{"client": "GHR", "reason": "lr 5 above the site's 0.1"}] and not row["rejected"]
    assert not fed.view.exhausted and [p["client"] for p in row["participants"]] == ["GARD"]
