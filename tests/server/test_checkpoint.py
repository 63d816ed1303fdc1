import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedslm.common.errors import UserError
from server import checkpoint
from server.checkpoint import ServerState


def state() -> ServerState:
    sampling = random.Random(3)
    sampling.random()
    return ServerState(round=2, adapter={"a.lora_B.weight": torch.randn(4, 2)}, sampling=sampling,
                       privacy_view={"clients": {"x": [{"round": 1}]}}, user_dp_events=[{"noise_multiplier": 1.0}])


def test_round_trip_restores_every_piece_of_state(tmp_path):
    saved = state()
    checkpoint.save(tmp_path, saved)
    back = checkpoint.load(tmp_path)
    assert back.round == 2 and back.privacy_view == saved.privacy_view and back.user_dp_events == saved.user_dp_events
    assert torch.equal(back.adapter["a.lora_B.weight"], saved.adapter["a.lora_B.weight"])
    assert back.sampling.random() == saved.sampling.random()
    assert not list(tmp_path.glob("*.tmp"))


def test_no_noise_state_is_ever_written(tmp_path):
    """A restored noise generator would replay a redone round's noise: the file holds the adapter and JSON only."""
    checkpoint.save(tmp_path, state())
    with safe_open(str(tmp_path / checkpoint.NAME), framework="pt") as handle:
        assert set(handle.keys()) == {"a.lora_B.weight"}
        assert set(json.loads(handle.metadata()["fedslm"])) == {"round", "sampling", "privacy_view", "user_dp_events"}
    assert not hasattr(checkpoint.load(tmp_path), "noise")


def test_an_older_checkpoint_loads_without_its_noise_state(tmp_path):
    old = state()
    meta = {"round": 2, "sampling": checkpoint._rng_to_json(old.sampling), "privacy_view": {}, "user_dp_events": []}
    noise = torch.Generator().manual_seed(11).get_state()
    save_file({**old.adapter, "__noise_generator_state__": noise}, str(tmp_path / checkpoint.NAME),
              metadata={"fedslm": json.dumps(meta)})
    back = checkpoint.load(tmp_path)
    assert set(back.adapter) == {"a.lora_B.weight"} and back.round == 2  # the generator state is dropped


def test_missing_or_damaged_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.load(tmp_path)
