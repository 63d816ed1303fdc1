"""Activation recomputation (slm/recompute.py): the same per-example gradients and DP-SGD step, less kept."""

import pytest
import torch
from opacus import GradSampleModule

from client.train import train_adapter
from slm.batch import collate
from slm.lora import adapter_state, set_adapter_state
from slm.loss import per_example_loss
from slm.recompute import recomputed_layers
from slm.tasks import Task, encode


def _batch(tokenizer, config, records):
    task = Task.from_config(config)
    return collate([encode(task, tokenizer, r) for r in records], tokenizer.pad_token_id)


def _grad_samples(model, batch, recompute: bool, steps: int = 2) -> dict:
    """Per-example gradients of the last of ``steps`` backward passes under Opacus hooks."""
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.train()
    try:
        with recomputed_layers(model, recompute):
            for _ in range(steps):  # a stale capture would show from the second step on
                for p in model.parameters():
                    p.grad, p.grad_sample = None, None
                per_example_loss(forward, batch).mean().backward()
        assert all(not getattr(m, "activations", []) for m in model.modules())  # every capture consumed
        return {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        forward._close()
        model.eval()


def test_per_example_gradients_are_those_without_recomputation(tiny, config, qa_records):
    model, tokenizer = tiny
    batch = _batch(tokenizer, config, qa_records[:5])
    plain = _grad_samples(model, batch, recompute=False)
    recomputed = _grad_samples(model, batch, recompute=True)
    assert plain and plain.keys() == recomputed.keys()
    for name in plain:
        assert plain[name].shape[0] == 5
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7)


def test_dp_sgd_round_is_the_same_with_recomputation(tiny, config, qa_records):
    """sigma 0 and a clip norm that binds: the update is the clipped per-example sum, step for step."""
    model, tokenizer = tiny
    task = Task.from_config(config)
    options = dict(steps=2, batch_size=4, lr=0.05, noise_multiplier=0.0, clip_norm=0.01, seed=3,
                   physical_batch_size=2)
    start = adapter_state(model)
    train_adapter(model, tokenizer, task, qa_records, **options)
    plain = adapter_state(model)
    set_adapter_state(model, start)
    with recomputed_layers(model):
        train_adapter(model, tokenizer, task, qa_records, **options)
    recomputed = adapter_state(model)
    assert any(not torch.equal(plain[k], start[k]) for k in start)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def _saved_bytes(model, batch, recompute: bool) -> int:
    """Bytes autograd keeps for the backward pass of one training forward."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.train()
    try:
        with recomputed_layers(model, recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            per_example_loss(model, batch).sum()
    finally:
        model.eval()
    return sum(kept)


def test_recomputation_keeps_less_and_is_undone_on_exit(tiny, config, qa_records):
    model, tokenizer = tiny
    batch = _batch(tokenizer, config, qa_records[:8])
    plain, recomputed = _saved_bytes(model, batch, False), _saved_bytes(model, batch, True)
    assert recomputed < 0.5 * plain
    assert _saved_bytes(model, batch, False) == plain  # the layers are plain again


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="no decoder"):
        with recomputed_layers(torch.nn.Linear(2, 2)):
            pass
