"""DP-AdamBC (client/adam_bc.py): Adam step for step without noise; the noise variance out of the second moment."""

import math

import pytest
import torch

from client.adam_bc import FLOOR, AdamBC, noise_variance, optimizer_for
from client.train import train_adapter
from slm.tasks import Task


def steps(optimizer_class, grads, **kwargs):
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = optimizer_class([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach()


def test_without_noise_it_is_adam_step_for_step():
    torch.manual_seed(0)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(20)]
    ours = steps(AdamBC, grads, lr=0.01, noise_variance=0.0)
    adam = steps(torch.optim.Adam, grads, lr=0.01)
    assert torch.allclose(ours, adam, rtol=1e-10, atol=1e-12)


def test_the_noise_variance_is_taken_out_of_the_second_moment_and_floored():
    """One step by hand: m^ = g, v^ = g^2, so each coordinate moves lr * g / (sqrt(max(g^2 - Phi, floor)) + eps)."""
    g = torch.tensor([0.3, -0.2, 0.05, 0.0, 1.0], dtype=torch.float64)
    phi = 0.01
    moved = -steps(AdamBC, [g], lr=0.1, noise_variance=phi)
    expected = [0.1 * x / (math.sqrt(max(x * x - phi, FLOOR)) + 1e-8) for x in g.tolist()]
    assert torch.allclose(moved, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    adam = -steps(torch.optim.Adam, [g], lr=0.1)
    assert moved[0] > adam[0] and moved[2] > 100 * adam[2]  # Adam's step is lr * sign(g): noise made it SGD
    with pytest.raises(ValueError):
        AdamBC([torch.nn.Parameter(torch.zeros(1))], lr=0.1, noise_variance=-1.0)


def test_the_variance_is_the_rounds_own_and_adam_is_the_default():
    assert noise_variance(0.5, 0.1, 8) == pytest.approx((0.5 * 0.1 / 8) ** 2)
    assert optimizer_for("adam", 0.01, 0.5, 0.1, 8) is None
    p = torch.nn.Parameter(torch.zeros(1))
    assert optimizer_for("adam-bc", 0.01, 0.5, 0.1, 8)([p]).param_groups[0]["noise_variance"] == \
        pytest.approx(noise_variance(0.5, 0.1, 8))
    assert optimizer_for("adam-bc", 0.01, None, 0.1, 8)([p]).param_groups[0]["noise_variance"] == 0.0


def test_it_trains_under_opacus_dp_sgd(tiny, qa_records):
    """Opacus wraps it as it wraps Adam: noise added once per step, then AdamBC's step."""
    from slm.lora import adapter_state, set_adapter_state

    model, tokenizer = tiny
    task = Task(kind="sft", max_length=48)
    runs = {}
    for name in ("adam", "adam-bc"):
        set_adapter_state(model, model._fedslm_initial)
        train_adapter(model, tokenizer, task, qa_records, steps=3, batch_size=4, lr=0.01, noise_multiplier=1.0,
                      clip_norm=0.1, seed=7, make_optimizer=optimizer_for(name, 0.01, 1.0, 0.1, 4))
        runs[name] = {k: v.clone() for k, v in adapter_state(model).items()}
    set_adapter_state(model, model._fedslm_initial)
    b = next(k for k in runs["adam"] if ".lora_B." in k)
    assert torch.isfinite(runs["adam-bc"][b]).all() and not torch.equal(runs["adam"][b], runs["adam-bc"][b])
