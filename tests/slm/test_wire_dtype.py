"""Adapter tensors on the wire in float16: half the bytes, fp32 for computing on both ends."""

import torch

from slm.lora import adapter_state, from_arrays, sent_tensors, through_wire, to_arrays


def test_float16_wire_halves_bytes_and_comes_back_fp32(tiny):
    model, _ = tiny
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    full, half = to_arrays(state).count_bytes(), to_arrays(state, "float16").count_bytes()
    payload = sum(v.numel() for v in state.values())
    assert full - half == 2 * payload  # 4 -> 2 bytes per number, same keys
    back = from_arrays(to_arrays(state, "float16"))
    assert all(back[k].dtype == torch.float32 for k in state)
    assert all(torch.equal(back[k], through_wire(state, "float16")[k]) for k in state)
    assert max(float((back[k] - state[k]).abs().max() / state[k].abs().max()) for k in state) < 1e-3
    assert not all(torch.equal(back[k], state[k]) for k in state)  # it really was rounded


def test_ffa_sends_only_b(tiny):
    model, _ = tiny
    state = adapter_state(model)
    ffa, fedavg = sent_tensors(state, "ffa"), sent_tensors(state, "fedavg")
    assert set(ffa) < set(fedavg) and all(".lora_B." in k for k in ffa)
    assert to_arrays(ffa, "float16").count_bytes() < to_arrays(fedavg, "float16").count_bytes()
