"""The round loop's privacy duties, driven through a fake Grid (tests/server/conftest.py).

- user-level cohorts come from OS entropy, never from server.seed;
- under user-level DP the checkpoint counting a round's noise is on disk before anything
  of the round is released, and a resumed run counts the redone round and draws new noise;
- metrics.jsonl and the console never name who was in a user-level cohort;
- replies without train_loss / seconds (DP clients) are reported and recorded.
"""

import itertools
import json

import pytest
import torch
from fake_grid import B, FakeGrid, initial_adapter
from safetensors import safe_open

from privacy.report.reconcile import account_user_level
from server import checkpoint
from server.user_dp import UserDpSpec, UserLevelStep

USER_DP = {"user-dp.enabled": True, "user-dp.clip-norm": 1.0, "user-dp.noise-multiplier": 1.0}


class Interrupted(Exception):
    """Stands for a kill between the noise draw and the release."""


def rows(fed) -> list[dict]:
    return [json.loads(line) for line in (fed.rundir.path / "metrics.jsonl").read_text().splitlines()]


def test_user_level_cohorts_come_from_os_entropy_not_from_server_seed(make_federation):
    grid = FakeGrid({n: (f"site-{n}", "ok") for n in range(256)})
    feds = [make_federation(grid, **USER_DP, **{"server.fraction-train": 0.5, "server.seed": 0}) for _ in range(2)]
    before = [fed.state.sampling.getstate() for fed in feds]
    cohorts = []
    for fed in feds:
        fed.user_level = UserLevelStep(UserDpSpec.of(fed.specs, 256), -1, [], [])
        cohorts.append(fed.sample(list(range(256))))
    # same server.seed, same state: a seeded draw would give the same cohort (chance of a tie: 2^-256)
    assert cohorts[0] != cohorts[1] and 64 < len(cohorts[0]) < 192
    assert [fed.state.sampling.getstate() for fed in feds] == before  # the seeded generator is not used at all


def test_without_user_dp_selection_is_seeded_and_replayed(make_federation):
    """No amplification is claimed without user-level DP; the selection stays reproducible across resumes."""
    grid = FakeGrid({n: (f"site-{n}", "ok") for n in range(50)})
    feds = [make_federation(grid, **{"server.fraction-train": 0.2, "server.seed": 4}) for _ in range(2)]
    assert feds[0].sample(list(range(50))) == feds[1].sample(list(range(50)))


@pytest.mark.parametrize("noise_seed", [-1, 5])
def test_an_interrupted_release_stays_counted_and_the_redone_round_draws_new_noise(
        make_federation, released, monkeypatch, noise_seed):
    from server import rounds

    grid = FakeGrid({n: (f"site-{n}", "still") for n in (1, 2, 3, 4)})  # every release = old adapter + noise
    settings = {**USER_DP, "server.fraction-train": 1.0, "server.noise-seed": noise_seed}
    fed = make_federation(grid, **settings)
    attempted = {}
    recorder = rounds.save_adapter

    def save_adapter(state, spec, base, out):
        if out.name == "round-2" and not attempted:  # the first release of round 2: the server dies here
            attempted.update(state=dict(state), checkpoint=checkpoint.load(fed.rundir.path),
                             rows=rows(fed), sent=list(grid.sent))
            raise Interrupted
        recorder(state, spec, base, out)

    monkeypatch.setattr(rounds, "save_adapter", save_adapter)
    with pytest.raises(Interrupted):
        fed.run(resumed=False)

    # at the first release step the checkpoint already counted round 2's draw, and nothing of round 2 had left
    pending = attempted["checkpoint"]
    assert pending.round == 1 and len(pending.user_dp_events) == 2
    assert [r["round"] for r in pending.privacy_view["user_level"]] == [1, 2]
    assert torch.equal(pending.adapter[B], released["round-1"][B])  # round 2 is redone from round 1's adapter
    assert [r["round"] for r in attempted["rows"]] == [0, 1]
    assert not [s for s in attempted["sent"] if s[0] == "evaluate" and s[2] == 2]
    with safe_open(str(fed.rundir.path / checkpoint.NAME), framework="pt") as handle:
        assert set(handle.keys()) == set(released["round-1"])  # no generator state next to the adapter
        assert set(json.loads(handle.metadata()["fedslm"])) == {"round", "sampling", "privacy_view",
                                                                 "user_dp_events"}

    fed.rundir.keep_metrics_through(pending.round)  # what server.app does on --resume
    resumed = make_federation(grid, state=checkpoint.load(fed.rundir.path), **settings, **{"run.resume": True})
    assert resumed.run(resumed=True)["rounds_completed"] == 3

    final = checkpoint.load(fed.rundir.path)
    assert len(final.user_dp_events) == 4  # rounds 1, 2 (interrupted), 2, 3: both releases of round 2 composed
    table = rows(resumed)
    assert [(r["round"], bool(r.get("interrupted"))) for r in table] == [(0, False), (1, False), (2, True),
                                                                        (2, False), (3, False)]
    records = [r["user_dp"] for r in table if "user_dp" in r]
    assert [r["round"] for r in records] == [1, 2, 2, 3] and records[1]["interrupted"]
    assert [r["epsilon"] for r in records] == sorted(r["epsilon"] for r in records) and \
        records[1]["epsilon"] < records[2]["epsilon"]
    account = account_user_level(table)  # the report recomputes all four draws and agrees
    assert not account.disagreements and account.epsilon == pytest.approx(records[-1]["epsilon"])
    view = json.loads((fed.rundir.path / "privacy" / "ledger.json").read_text())
    assert [r["round"] for r in view["user_level"]] == [1, 2, 2, 3]
    # the redone round's noise is none of the earlier draws (a replay would let the two releases cancel it)
    def wire(tensor):  # what the noise was added to: the previous adapter, through the fp16 wire
        return tensor.half().float()

    noises = {"1": released["round-1"][B] - wire(initial_adapter()[B]),
              "2, interrupted": attempted["state"][B] - wire(released["round-1"][B]),
              "2, redone": released["round-2"][B] - wire(released["round-1"][B]),
              "3": released["round-3"][B] - wire(released["round-2"][B])}
    assert all(0.2 < float(n.std()) < 0.3 for n in noises.values())  # z S / (q N) = 0.25
    for a, b in itertools.combinations(noises, 2):
        assert not torch.allclose(noises[a], noises[b], atol=0.01), (a, b)


def test_noise_is_drawn_from_a_fresh_generator_per_process(make_federation, monkeypatch):
    """Two processes of the same run (same config, same checkpoint) never share noise."""
    grid = FakeGrid({n: (f"site-{n}", "ok") for n in (1, 2)})
    feds = [make_federation(grid, **USER_DP, **{"server.rounds": 1, "run.id": f"run{i}"}) for i in range(2)]
    for fed in feds:
        fed.run(resumed=False)
    adapters = [checkpoint.load(fed.rundir.path).adapter[B] for fed in feds]
    assert not torch.equal(adapters[0], adapters[1])


def test_user_level_rows_and_console_name_nobody_of_the_cohort(make_federation, capsys):
    names = {1: "Amsel", 2: "Birke", 3: "Chiara", 4: "Dorn", 5: "Esche"}
    behaviour = {1: "ok", 2: "ok", 3: "refuse", 4: "crash", 5: "nan"}
    grid = FakeGrid({n: (names[n], behaviour[n]) for n in names})
    fed = make_federation(grid, **USER_DP, **{"server.fraction-train": 1.0, "server.rounds": 1})
    fed.run(resumed=False)
    row = rows(fed)[1]
    assert "participants" not in row and row["cohort"] == row["user_dp"]["cohort"] == 2 and "train_loss" not in row
    assert len(row["refused"]) == len(row["failed"]) == len(row["rejected"]) == 1
    assert all(set(e) == {"reason"} for e in row["refused"] + row["failed"] + row["rejected"])
    training = json.dumps({k: v for k, v in row.items() if k != "eval_clients"})  # evaluation: all clients, fixed
    assert not [n for n in names.values() if n in training]
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[fedslm] round 1:") and "eval loss" not in line]
    assert lines and not [line for line in lines for n in names.values() if n in line]
    assert any("a sampled client refused: budget exhausted" in line for line in lines)
    view = json.loads((fed.rundir.path / "privacy" / "ledger.json").read_text())
    assert set(view["clients"]) == {"Amsel", "Birke", "Chiara", "Esche"}  # the sites' own reports stay in the view


def test_dp_replies_without_train_loss_or_seconds(make_federation, capsys):
    fed = make_federation(FakeGrid({1: ("GARD", "ok")}, dp=True))
    outcome = fed.train(1, [1], eligible=1)
    new, row = outcome.update, outcome.row()
    assert "round 1: GARD trained on 225 records, eps 6.309 (sigma 0.500)" in capsys.readouterr().out
    assert new is not None and "train_loss" not in row
    assert row["participants"] == [{"client": "GARD", "update_norm": pytest.approx(row["participants"][0]
                                                                                   ["update_norm"]),
                                    "num-examples": 225, "steps": 5}]


def test_replies_with_train_loss_and_seconds_still_reported(make_federation, capsys):
    fed = make_federation(FakeGrid({1: ("GARD", "ok")}, dp=False), **{"dp.enabled": False})
    row = fed.train(1, [1], eligible=1).row()
    assert "round 1: GARD train loss 2.0000 on 225 records in 3.0s" in capsys.readouterr().out
    assert row["train_loss"] == pytest.approx(2.0)
