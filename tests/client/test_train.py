"""DP-SGD on the adapter, checked against a hand computation."""

import pytest
import torch

from client.train import train_adapter
from slm.errors import UserError
from slm.lora import adapter_state
from slm.tasks import Task, collate, encode, per_example_loss


def manual_clipped_mean(model, tok, task, records, clip):
    """sum_i clip(grad of example i's own loss) / N, one example at a time (no Opacus)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for record in records:
        batch = collate([encode(task, tok, record)], tok.pad_token_id)
        loss = per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(records) for t in total]


def test_dp_step_with_zero_noise_equals_manual_per_example_clipping(tiny, qa_records):
    """sigma=0, q=1: the Opacus update must equal SGD on hand-clipped per-example grads."""
    model, tok = tiny
    task = Task(kind="sft", max_length=48)
    records = qa_records[:6]
    # Step from a point where lora_B != 0, so A's gradients are not trivially zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    expected = manual_clipped_mean(model, tok, task, records, clip=0.05)
    assert any(float(e.abs().max()) > 0 for e in expected)
    train_adapter(model, tok, task, records, steps=1, batch_size=len(records), lr=1.0, noise_multiplier=0.0,
                  clip_norm=0.05, seed=0, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    for p, b, e in zip(params, before, expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-4, atol=1e-7)


def test_lora_weights_change_after_dp_steps(tiny, qa_records):
    """Regression guard for Opacus issue #820 (silently unchanged/corrupted LoRA updates)."""
    model, tok = tiny
    before = adapter_state(model)
    train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=2, batch_size=6, lr=0.01,
                  noise_multiplier=0.5, clip_norm=1.0, seed=0)
    after = adapter_state(model)
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
        assert torch.isfinite(after[name]).all()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters()), "Opacus hooks left behind"


def test_same_seed_same_update_and_noise_matters(tiny, qa_records):
    model, tok = tiny
    task = Task(kind="sft", max_length=48)
    initial = adapter_state(model)
    runs = []
    for sigma, seed in ((1.0, 7), (1.0, 7), (1.0, 8)):
        from slm.lora import set_adapter_state

        set_adapter_state(model, initial)
        train_adapter(model, tok, task, qa_records, steps=2, batch_size=4, lr=0.01, noise_multiplier=sigma,
                      clip_norm=1.0, seed=seed)
        runs.append(adapter_state(model))
    key = next(iter(initial))
    assert torch.equal(runs[0][key], runs[1][key])
    assert not torch.equal(runs[0][key], runs[2][key])


def test_empty_poisson_batches_still_step_with_noise(tiny, qa_records):
    """q tiny: most batches are empty, yet every step releases noise (the adapter moves)."""
    model, tok = tiny
    records = qa_records * 20  # 480 records, q = 1/480
    before = adapter_state(model)
    result = train_adapter(model, tok, Task(kind="sft", max_length=48), records, steps=3, batch_size=1, lr=0.01,
                           noise_multiplier=1.0, clip_norm=1.0, seed=3)
    assert result.examples_seen <= 3 and result.sample_rate == pytest.approx(1 / 480)
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_batch_larger_than_data_is_a_clear_error(tiny, qa_records):
    model, tok = tiny
    with pytest.raises(UserError, match="train.batch-size.*64 is larger than client's 24 training records"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=64, lr=0.01,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0)
