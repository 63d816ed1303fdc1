import random

import pytest
import torch

from server import checkpoint
from server.checkpoint import ServerState
from slm.errors import UserError


def test_round_trip_restores_every_piece_of_state(tmp_path):
    sampling = random.Random(3)
    sampling.random()
    noise = torch.Generator().manual_seed(11)
    torch.randn(5, generator=noise)
    state = ServerState(round=2, adapter={"a.lora_B.weight": torch.randn(4, 2)}, sampling=sampling, noise=noise,
                        privacy_view={"clients": {"x": [{"round": 1}]}}, user_dp_events=[{"noise_multiplier": 1.0}])
    checkpoint.save(tmp_path, state)
    back = checkpoint.load(tmp_path)
    assert back.round == 2 and back.privacy_view == state.privacy_view and back.user_dp_events == state.user_dp_events
    assert torch.equal(back.adapter["a.lora_B.weight"], state.adapter["a.lora_B.weight"])
    assert back.sampling.random() == sampling.random()
    assert torch.equal(torch.randn(3, generator=back.noise), torch.randn(3, generator=noise))
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_or_damaged_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.load(tmp_path)
