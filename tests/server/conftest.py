"""Fixtures that drive server.rounds.Federation through fake_grid.py: no Flower, no model.

Saving an adapter is replaced by a recorder, so a test sees every adapter the server released.
"""

import pytest
from fake_grid import FakeMessage, initial_adapter

from fedslm.common.config import resolve
from fedslm.common.vocabulary import RunConfig
from server import rounds
from server.rundir import RunDir


@pytest.fixture
def released(monkeypatch):
    """Every adapter the server writes, by directory name (round-k), in order; Flower's Message faked."""
    saved = {}

    def save_adapter(state, spec, base_model_path, out):
        saved[out.name] = {k: v.clone() for k, v in state.items()}

    monkeypatch.setattr(rounds, "save_adapter", save_adapter)
    monkeypatch.setattr(rounds, "Message", FakeMessage)
    return saved


@pytest.fixture
def make_federation(tmp_path, released):
    def make(grid, state=None, **overrides):
        config = resolve({"model.name": "tiny", "server.min-clients": 1, "server.rounds": 3, "server.timeout": 5.0,
                          "run.root": str(tmp_path), "run.id": "run", **overrides})
        rundir = RunDir.create(config["run.root"], config["run.id"])
        state = state or rounds.initial_state(initial_adapter(), config["server.seed"])
        return rounds.Federation(grid, RunConfig.parse(config), rundir, state, "base")

    return make
