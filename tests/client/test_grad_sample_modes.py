"""Every grad-sample mode and the bf16 autocast compute the same clipped DP-SGD update."""

import pytest
import torch

from client.train import train_adapter
from slm.errors import UserError
from slm.lora import set_adapter_state
from slm.tasks import Task


def _update(model, tok, records, **options):
    """The parameter change of one sigma=0, q=1 DP-SGD step from a fixed non-zero adapter."""
    set_adapter_state(model, model._fedslm_initial)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train_adapter(model, tok, Task(kind="sft", max_length=48), records, steps=1, batch_size=len(records), lr=1.0,
                  noise_multiplier=0.0, clip_norm=0.05, seed=0, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                  **options)
    return [b - p.detach() for p, b in zip(params, before)]


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_modes_agree_with_hooks(tiny, qa_records, mode):
    model, tok = tiny
    reference = _update(model, tok, qa_records[:6], grad_sample_mode="hooks")
    assert any(float(r.abs().max()) > 0 for r in reference)
    other = _update(model, tok, qa_records[:6], grad_sample_mode=mode)
    error = sum(float((o - r).norm()) ** 2 for r, o in zip(reference, other)) ** 0.5
    assert error <= 1e-4 * sum(float(r.norm()) ** 2 for r in reference) ** 0.5


def test_bf16_autocast_is_close_to_fp32(tiny, qa_records):
    model, tok = tiny
    reference = _update(model, tok, qa_records[:6])
    bf16 = _update(model, tok, qa_records[:6], autocast="bf16")
    for r, b in zip(reference, bf16):
        assert float((b - r).norm()) <= 0.1 * float(r.norm()) + 1e-7


def test_ghost_mode_takes_noise_only_steps_on_empty_batches(tiny, qa_records):
    model, tok = tiny
    result = train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=3, batch_size=1, lr=0.01,
                           noise_multiplier=1.0, clip_norm=1.0, seed=3, grad_sample_mode="ghost")
    assert result.steps == 3
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize("option", [{"grad_sample_mode": "vmap"}, {"autocast": "fp16"}])
def test_unknown_mode_or_autocast_is_a_user_error(tiny, qa_records, option):
    model, tok = tiny
    with pytest.raises(UserError, match="train.grad-sample-mode|train.autocast"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=2, lr=0.01,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0, **option)
