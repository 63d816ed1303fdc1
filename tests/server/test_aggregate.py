import pytest
import torch

from server.aggregate import average_lora_factors


def test_one_client_is_returned_unchanged():
    state = {"a": torch.randn(4, 3), "b": torch.randn(3, 4)}
    out = average_lora_factors([state], [17])
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_weighted_by_examples():
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.testing.assert_close(average_lora_factors([a, b], [1, 3])["w"], torch.full((2,), 0.75))


def test_invalid_weights():
    with pytest.raises(ValueError):
        average_lora_factors([{"w": torch.zeros(1)}], [0])
    with pytest.raises(ValueError):
        average_lora_factors([], [])
