"""`fedslm simulate`'s exit code and last line: 0 when every planned round trained, 3 when fewer did (none included)."""

import argparse
import json

import pytest

import simulation.engine
from fedslm.cli import simulate as cli
from fedslm.common.config import resolve

ROW1_REFUSED = {"round": 1, "sampled": 2, "participants": [], "refused": [{"client": "a", "reason": "budget"}],
                "failed": [], "rejected": [], "skipped": True}
ROW_TRAINED = {"sampled": 1, "participants": [{"client": "a"}], "refused": [], "failed": [], "rejected": []}


def fake_run(rows, event):
    def run(config, clients, **_):
        run_dir = cli.Path(config["run.root"]) / config["run.id"]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "events.jsonl").write_text(json.dumps(event) + "\n")
    return run


@pytest.mark.parametrize("rows, event, code, last", [
    ([{"round": 0}, ROW1_REFUSED], {"event": "stopped", "stopped": "only 0 clients still have budget"}, 3,
     "[fedslm] done: 0 of 2 rounds trained (1 round had no usable update: every client failed or refused, or too "
     "few valid updates) (stopped early: only 0 clients still have budget); exit code 3"),
    ([{"round": 0}, {"round": 1, **ROW_TRAINED}, {"round": 2, **ROW_TRAINED}], {"event": "finished"}, 0,
     "[fedslm] done: 2 of 2 rounds trained"),
])
def test_simulate_exits_3_when_fewer_rounds_trained_than_planned(tmp_path, monkeypatch, capsys, rows, event, code,
                                                                  last):
    monkeypatch.setattr(simulation.engine, "run_in_simulation", fake_run(rows, event))
    (tmp_path / "run").mkdir()
    args = argparse.Namespace(cpus_per_client=None, client_app="client.app:app", gpus_per_client=0.0, ray_address=None)
    config = resolve({"run.root": str(tmp_path), "run.id": "run", "server.rounds": 2})
    assert cli._simulate(config, 2, args, tmp_path / "run") == code
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == last
