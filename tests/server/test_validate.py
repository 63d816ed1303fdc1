import pytest
import torch

from server.validate import Rejected, update_norm, validate_update

REF = {"x.lora_B.weight": torch.zeros(4, 2), "y.lora_B.weight": torch.zeros(3, 2)}


def test_valid_update_returns_its_norm():
    state = {k: v + 0.5 for k, v in REF.items()}
    assert validate_update(state, REF, max_norm=10) == pytest.approx(update_norm(state, REF)) == pytest.approx(
        (14 * 0.25) ** 0.5)


@pytest.mark.parametrize("mutate, reason", [
    (lambda s: s.pop("y.lora_B.weight"), "missing"),
    (lambda s: s.update({"z": torch.zeros(1)}), "extra"),
    (lambda s: s.update({"x.lora_B.weight": torch.zeros(2, 4)}), "shape"),
    (lambda s: s.update({"x.lora_B.weight": torch.zeros(4, 2, dtype=torch.float16)}), "dtype"),
    (lambda s: s["x.lora_B.weight"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda s: s["x.lora_B.weight"].__setitem__((0, 0), float("inf")), "non-finite"),
    (lambda s: s["x.lora_B.weight"].__setitem__((0, 0), 1e6), "exceeds server.max-update-norm"),
])
def test_bad_replies_are_rejected_with_a_reason(mutate, reason):
    state = {k: v.clone() for k, v in REF.items()}
    mutate(state)
    with pytest.raises(Rejected, match=reason):
        validate_update(state, REF, max_norm=1000)
