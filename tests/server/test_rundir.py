"""A run directory is written by one run: a new run never appends to an earlier one.

A deployment that re-uses a run id (deploy/HOSPITAL.md's `run.id='hospital-demo'`) gets
`<run.id>-2` (then -3, ...); the earlier run's files stay byte-identical, and config.json,
the sites' run id and the console name the directory the run wrote. run.resume continues
a run in its own directory.
"""

import json

import pytest
from fake_grid import FakeGrid, initial_adapter
from flwr.app import Context, RecordDict

from fedslm.common.config import resolve
from server import app
from server.rundir import RunDir


def used(path):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"round": 0}\n')
    return path


def snapshot(root):
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_new_run_takes_the_first_directory_that_holds_no_run(tmp_path):
    used(tmp_path / "demo")
    used(tmp_path / "demo-2")
    (tmp_path / "demo-3").write_text("a file, not a directory")
    assert RunDir.create(str(tmp_path), "demo", fresh=True).path == tmp_path / "demo-4"
    assert RunDir.create(str(tmp_path), "demo", fresh=False).path == tmp_path / "demo"  # run.resume: its own
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "simulation.json").write_text("{}")  # written by `fedslm simulate` just before the server
    assert RunDir.create(str(tmp_path), "new", fresh=True).path == tmp_path / "new"
    assert RunDir.create(str(tmp_path), "other", fresh=True).path == tmp_path / "other"


class RecordingGrid(FakeGrid):
    """The fake sites, remembering the run id and run directory each message named."""

    runs: set = set()

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        self.runs = self.runs | {(m.content["config"]["run-id"], m.content["config"]["run-dir"]) for m in messages}
        return super().send_and_receive(messages, timeout)


def test_a_deployment_reusing_a_run_id_writes_a_fresh_directory(tmp_path, released, monkeypatch, capsys):
    monkeypatch.setattr(app, "attach", lambda *args, **kwargs: (None, None))  # no model: the fake adapter
    monkeypatch.setattr(app, "adapter_state", lambda model: initial_adapter())
    monkeypatch.setattr(app, "resolve_model_dir", lambda name: "base")
    monkeypatch.setattr(app, "write_report", lambda path: path / "report.html")
    old = used(tmp_path / "hospital-demo")
    (old / "config.json").write_text('{"run.id": "hospital-demo"}')
    before = snapshot(tmp_path)
    config = resolve({"model.name": "tiny", "server.min-clients": 1, "server.rounds": 1, "server.timeout": 5.0,
                      "run.root": str(tmp_path), "run.id": "hospital-demo"})
    grid = RecordingGrid({n: (f"site-{n}", "ok") for n in (1, 2)})
    app.main(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config))

    fresh = tmp_path / "hospital-demo-2"
    assert {p: v for p, v in snapshot(tmp_path).items() if fresh not in (p, *p.parents)} == before
    assert [json.loads(line)["round"] for line in (fresh / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((fresh / "config.json").read_text())["run.id"] == "hospital-demo-2"
    assert grid.runs == {("hospital-demo-2", str(fresh))}  # the sites' ledgers name the run it is
    out = capsys.readouterr().out
    assert (f"[fedslm] {old} already holds a run: this run writes {fresh} (run.resume=true continues that one)"
            in out.splitlines())
    assert f"run directory: {fresh}" in out


def test_the_longest_run_id_still_fits_the_sites_after_its_re_use_suffix(tmp_path):
    """Issue 27: a 127-128 character run id became 129+ with '-2', which every site refused."""
    from client.request import RUN_ID as SITE_RUN_ID
    from fedslm.common.config import RUN_ID_MAX
    from fedslm.common.errors import UserError
    from server.rundir import RunDir

    longest = "r" * RUN_ID_MAX
    resolve({"run.id": longest})
    first = RunDir.create(str(tmp_path), longest, fresh=True)
    (first.path / "config.json").write_text("{}")
    again = RunDir.create(str(tmp_path), longest, fresh=True)
    assert again.path.name == longest + "-2" and SITE_RUN_ID.fullmatch(again.path.name)
    for bad in ("r" * (RUN_ID_MAX + 1), "my run", "../elsewhere"):
        with pytest.raises(UserError, match="config key 'run.id'"):
            resolve({"run.id": bad})
