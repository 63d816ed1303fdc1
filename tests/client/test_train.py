"""DP-SGD on the adapter, checked against a hand computation."""

import pytest
import torch
from start_point import nonzero_lora_b

from client.train import train_adapter
from fedslm.common.errors import UserError
from slm.batch import collate, per_example_loss
from slm.lora import adapter_state
from slm.tasks import Task, encode


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
    params, before = nonzero_lora_b(model)
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


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps the gradient the DP optimizer handed it (clipped sum + noise, / expected batch)."""

    grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def empty_batch_step(model, tok, records, *, sigma, clip, batch_size, mode="hooks"):
    """(gradient handed to the optimizer, adapter before, adapter after) of one DP step whose Poisson batch is empty.

    Seeds are tried until the sampled batch is empty (probability (1 - q)^N each); the
    gradient is None if no optimizer step was taken.
    """
    from slm.lora import set_adapter_state

    for seed in range(300):
        set_adapter_state(model, model._fedslm_initial)
        before, optimizers = adapter_state(model), []
        result = train_adapter(model, tok, Task(kind="sft", max_length=48), records, steps=1, batch_size=batch_size,
                               lr=1.0, noise_multiplier=sigma, clip_norm=clip, seed=seed, grad_sample_mode=mode,
                               make_optimizer=lambda ps: optimizers.append(RecordingSGD(ps, lr=1.0)) or optimizers[-1])
        if result.examples_seen == 0:
            return optimizers[-1].grads, before, adapter_state(model)
    pytest.fail("no empty Poisson batch in 300 seeds")


def assert_noise_only_step(model, tok, records, *, mode="hooks"):
    """An empty Poisson batch still takes a step that releases noise, and only noise.

    Opacus' DP-SGD step with no sampled example: the clipped sum is 0, the optimizer gets
    N(0, (sigma C)^2) / expected batch in every coordinate (Abadi et al. 2016, Algorithm 1,
    with Poisson sampling; Opacus DPOptimizer add_noise + scale_grad, loss_reduction "mean").
    sigma = 0: the step is taken (the optimizer sees the gradient) and nothing moves.
    """
    sigma, clip, batch = 1.0, 0.5, 2
    grads, before, after = empty_batch_step(model, tok, records, sigma=sigma, clip=clip, batch_size=batch, mode=mode)
    assert grads is not None, "no optimizer step on an empty Poisson batch: its noise was never released"
    noise = torch.cat([g.flatten() for g in grads]).double()
    expected = sigma * clip / batch
    assert abs(float(noise.std()) / expected - 1) < 0.05, (float(noise.std()), expected)
    assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move with the noise"
    grads, before, after = empty_batch_step(model, tok, records, sigma=0.0, clip=clip, batch_size=batch, mode=mode)
    assert grads is not None and all(float(g.abs().max()) == 0 for g in grads)
    assert all(torch.equal(before[k], after[k]) for k in before), "an empty batch without noise moved the adapter"


def test_empty_poisson_batches_still_step_with_noise(tiny, qa_records):
    """An empty batch (q = 1/12, N = 24: probability 12%) moves the adapter by noise of std sigma*C/B only."""
    model, tok = tiny
    assert_noise_only_step(model, tok, qa_records)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_batch_larger_than_data_is_a_clear_error(tiny, qa_records):
    model, tok = tiny
    with pytest.raises(UserError, match="train.batch-size.*64 is larger than client's 24 training records"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=64, lr=0.01,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0)
