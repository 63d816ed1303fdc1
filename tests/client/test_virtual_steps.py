"""Virtual steps: a logical Poisson batch in physical micro-batches is the same DP-SGD step (one noise draw)."""

import pytest
import torch
from start_point import nonzero_lora_b
from test_train import RecordingSGD  # tests/client is on sys.path (pytest rootdir import)

from client.train import train_adapter
from fedslm.common.errors import UserError
from slm.lora import set_adapter_state
from slm.tasks import Task


def _step(model, tok, records, *, sigma, physical, mode="hooks", seed=0, clip=0.05):
    """(gradient handed to SGD, parameter change) of one q = 1 step from a fixed non-zero adapter."""
    set_adapter_state(model, model._fedslm_initial)
    params, before = nonzero_lora_b(model)
    optimizers = []
    train_adapter(model, tok, Task(kind="sft", max_length=48), records, steps=1, batch_size=len(records), lr=1.0,
                  noise_multiplier=sigma, clip_norm=clip, seed=seed, grad_sample_mode=mode,
                  physical_batch_size=physical,
                  make_optimizer=lambda ps: optimizers.append(RecordingSGD(ps, lr=1.0)) or optimizers[-1])
    return optimizers[-1].grads, [b - p.detach() for p, b in zip(params, before)]


def _relative_error(a, b):
    num = sum(float((x - y).double().norm()) ** 2 for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.double().norm()) ** 2 for y in b) ** 0.5


@pytest.mark.parametrize("mode", ["hooks", "ghost"])  # functorch differs from hooks in the grad sampler only
def test_micro_batched_step_equals_one_piece_step(tiny, qa_records, mode):
    """7 records in micro-batches of 3, 3, 1: the same update as one piece at sigma = 0 (to 1e-5).

    Both DP optimizers: hooks' accumulates clipped per-example gradients, ghost's the clipped
    sums of its second backward pass (DPOptimizerFastGradientClipping.accumulate).
    """
    model, tok = tiny
    _, whole = _step(model, tok, qa_records[:7], sigma=0.0, physical=0, mode=mode)
    _, pieces = _step(model, tok, qa_records[:7], sigma=0.0, physical=3, mode=mode)
    assert any(float(w.abs().max()) > 0 for w in whole)
    assert _relative_error(pieces, whole) < 1e-5


def test_same_noise_draw_gives_the_same_noised_step(tiny, qa_records):
    """sigma = 1, same generator state: the micro-batched step releases exactly the one-piece step's update."""
    model, tok = tiny
    _, whole = _step(model, tok, qa_records[:7], sigma=1.0, physical=0, seed=3)
    _, pieces = _step(model, tok, qa_records[:7], sigma=1.0, physical=2, seed=3)
    assert _relative_error(pieces, whole) < 1e-5


def test_noise_is_added_once_per_logical_step(tiny, qa_records):
    """4 micro-batches: the adapter moves by clipped sum / B plus noise of std sigma*C/B, not sqrt(4) times that.

    The noise is isolated as (gradient at sigma) - (gradient at sigma = 0) with the same
    Poisson batch (q = 1); sigma C / B is the std of Opacus' add_noise + scale_grad with
    loss_reduction "mean" (Abadi et al. 2016, Algorithm 1).
    """
    model, tok = tiny
    sigma, clip, records = 2.0, 0.05, qa_records[:8]
    _, noised = _step(model, tok, records, sigma=sigma, physical=2, clip=clip)  # whole change, SGD lr = 1
    _, clean = _step(model, tok, records, sigma=0.0, physical=2, clip=clip)
    noise = torch.cat([(n - c).flatten() for n, c in zip(noised, clean)]).double()
    expected = sigma * clip / len(records)
    assert noise.numel() > 5000
    assert abs(float(noise.std()) / expected - 1) < 0.05, (float(noise.std()), expected)


def test_no_forward_pass_is_larger_than_the_physical_batch(tiny, qa_records):
    """Expected batch 12 of 24 records in pieces of at most 4: every forward pass sees at most 4 rows."""
    model, tok = tiny
    sizes = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        result = train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=12,
                               lr=0.01, noise_multiplier=1.0, clip_norm=1.0, seed=0, physical_batch_size=4)
    finally:
        handle.remove()
    assert result.examples_seen > 4 and max(sizes) <= 4
    assert sum(sizes) == result.examples_seen


def test_negative_physical_batch_is_a_user_error(tiny, qa_records):
    model, tok = tiny
    with pytest.raises(UserError, match="train.physical-batch-size"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=2, lr=0.01,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0, physical_batch_size=-1)
