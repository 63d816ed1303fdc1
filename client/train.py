"""Local DP-SGD on the LoRA adapter (Opacus), with Poisson sampling.

Each step includes every training record independently with probability
q = expected_batch / records (Poisson sampling, which is what the accountants assume;
never replaced by shuffling). Opacus computes per-example gradients of the adapter
(hooks mode), clips each to ``clip_norm``, sums, adds N(0, (sigma * C)^2) and divides by
the EXPECTED batch size. An empty Poisson batch still takes a step: the released noise
is part of the mechanism. ``train.grad-sample-mode`` and ``train.autocast`` choose how
(defaults: the fastest measured, BENCHMARKS.md). Clipping norms are always taken in fp32,
also under bf16 autocast (fp32_grad_samples, _GhostClippingFp32Norms); ghost clipping with
bf16 autocast is refused under DP, because its clipped sum comes from a bf16 backward pass.

Randomness (sampling and noise) comes from one explicit generator per client and round,
whose whole Mersenne-Twister state is derived from the ``seed`` entropy
(privacy.mechanism.entropy: torch's manual_seed would keep only 32 bits). secure_mode is
off: Opacus' cryptographically secure RNG needs torchcsprng, which is not installable
here; reports say so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from privacy.mechanism.entropy import generator_from_entropy, seed_entropy
from slm.errors import UserError
from slm.tasks import Task, collate, encode, per_example_loss

# How Opacus gets each example's clipped gradient (BENCHMARKS.md, "DP overhead"):
# hooks = per-example gradients from captured activations and backprops (one backward);
# functorch = the same via torch.func vmap; ghost = per-example gradient NORMS only, then a
# second backward on the clip-weighted loss (saves memory, costs a second backward).
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
AUTOCAST = ("none", "bf16")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean of the per-step batch losses (before each update)
    steps: int
    sample_rate: float
    examples_seen: int


def sample_rate(batch_size: int, records: int, where: str = "client") -> float:
    if batch_size < 1:
        raise UserError("config key 'train.batch-size': must be at least 1")
    if batch_size > records:
        raise UserError(
            f"config key 'train.batch-size': {batch_size} is larger than {where}'s {records} training records"
        )
    return batch_size / records


def autocast_context(autocast: str):
    """bf16 autocast of the forward pass on CPU (matmuls in bf16, losses and LoRA factors in fp32)."""
    if autocast == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if autocast != "none":
        raise UserError(f"config key 'train.autocast': {autocast!r} is not one of {', '.join(AUTOCAST)}")
    return contextlib.nullcontext()


class _GhostClippingFp32Norms(GradSampleModuleFastGradientClipping):
    """Ghost clipping whose per-example gradient norms are taken in fp32.

    Opacus 1.6.0 computes ghost norms from the captured activations and backprops in the
    backprops' dtype (``compute_linear_norm_sample`` casts the activations to it), so a
    bf16 backprop makes the norm each clip coefficient C / (norm + 1e-6) divides by off by
    bf16 rounding (8 significant bits; the ghost identity ||sum_t b_t a_t^T||_F^2 =
    <B B^T, A A^T>_F of Li et al., "Large Language Models Can Be Strong Differentially
    Private Learners", ICLR 2022, sums T^2 rounded terms). Upcasting both here makes every
    norm the fp32 norm of the example's gradient from the same captured values. Under bf16
    autocast that is still not enough (the clipped sum itself comes from a second bf16
    backward pass), so train_adapter refuses ghost with bf16 under DP.
    """

    def rearrange_grad_samples(self, **kwargs):
        activations, backprops = super().rearrange_grad_samples(**kwargs)
        return [a.float() if a.is_floating_point() else a for a in activations], backprops.float()


def fp32_grad_samples(optimizer) -> None:
    """Per-example gradients in fp32 before the DP optimizer clips them (hooks, functorch).

    Under bf16 autocast Opacus' hooks give bf16 per-example gradients of the fp32 LoRA
    weights, and ``DPOptimizer.clip_and_accumulate`` (Opacus 1.6.0) takes their L2 norms
    in that dtype, casting to the parameter's dtype only afterwards: a norm rounded down
    (bf16 keeps 8 significant bits, relative error up to 2^-9) lets a "clipped" gradient
    exceed C, and the sensitivity C that the accountant assumes for DP-SGD (Abadi et al.,
    "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1) no longer holds. In
    fp32 each norm is the norm of the very values that are scaled and summed, up to fp32
    rounding. Ghost mode keeps no per-example gradients (see _GhostClippingFp32Norms).
    """
    for p in optimizer.params:
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != torch.float32:
            p.grad_sample = sample.float()
        elif isinstance(sample, list):
            p.grad_sample = [s.float() for s in sample]


def make_private(model, optimizer, *, mode: str, noise_multiplier: float, clip_norm: float, batch_size: int,
                 generator: torch.Generator):
    """(forward module, DP optimizer) for a grad-sample mode; ``forward._close()`` undoes it."""
    if mode not in GRAD_SAMPLE_MODES:
        raise UserError(f"config key 'train.grad-sample-mode': {mode!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}")
    if mode == "ghost":
        forward = _GhostClippingFp32Norms(model, batch_first=True, loss_reduction="mean",
                                          max_grad_norm=clip_norm, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=noise_multiplier,
                                                    max_grad_norm=clip_norm, expected_batch_size=batch_size,
                                                    loss_reduction="mean", generator=generator)
        return forward, optimizer
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                            expected_batch_size=batch_size, generator=generator)
    return forward, optimizer


def take_step(forward, optimizer, batch: dict, *, mode: str | None, autocast: str = "none") -> float:
    """One optimizer step on one batch; ``mode`` None = non-private. Returns the batch loss.

    Shared by training and the DP-overhead benchmark, so the benchmark times exactly this.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(autocast):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = per_example_loss(logits, batch["labels"])
    if mode == "ghost":
        DPTensorFastGradientClipping(forward, optimizer, losses, "mean").backward()
    else:
        losses.mean().backward()
        if mode is not None:
            fp32_grad_samples(optimizer)  # clipping norms in fp32, also under bf16 autocast
    optimizer.step()
    return float(losses.detach().mean())


def _empty_step(optimizer, params, mode: str) -> None:
    """An empty Poisson batch: zero clipped sum, noise only."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()


def train_adapter(model, tokenizer, task: Task, records: list[dict], *, steps: int, batch_size: int, lr: float,
                  noise_multiplier: float | None, clip_norm: float, seed: bytes | int,
                  make_optimizer=None, grad_sample_mode: str = "hooks", autocast: str = "none") -> TrainResult:
    """Run ``steps`` optimizer steps; DP-SGD when ``noise_multiplier`` is not None.

    ``seed``: entropy bytes (>= 16; a site passes fresh OS entropy), or an int for a
    reproducible run (tests, benchmarks), expanded by privacy.mechanism.entropy.
    ``make_optimizer(params)`` replaces the default Adam(lr) (tests use plain SGD to
    compare an update with hand-computed clipped gradients).
    """
    examples = [encode(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(records)]
    q = sample_rate(batch_size, len(examples))
    autocast_context(autocast)  # reject a bad value before any step
    if noise_multiplier is not None and grad_sample_mode == "ghost" and autocast == "bf16":
        raise UserError("config keys 'train.grad-sample-mode' = ghost and 'train.autocast' = bf16 do not go together "
                        "under DP: ghost clipping recomputes the clipped sum in a second bf16 backward pass, so a "
                        "clipped example's gradient can exceed the clip norm (measured: by up to 0.15%); use hooks "
                        "or functorch with bf16")
    generator = generator_from_entropy(seed if isinstance(seed, bytes) else seed_entropy(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if make_optimizer else torch.optim.Adam(params, lr=lr)
    private = noise_multiplier is not None
    forward = model
    if private:
        forward, optimizer = make_private(model, optimizer, mode=grad_sample_mode, noise_multiplier=noise_multiplier,
                                          clip_norm=clip_norm, batch_size=batch_size, generator=generator)
    mode = grad_sample_mode if private else None
    model.train()
    losses, seen = [], 0
    try:
        for _ in range(steps):
            chosen = (torch.rand(len(examples), generator=generator) < q).nonzero().flatten().tolist()
            if not chosen:
                optimizer.zero_grad(set_to_none=True)
                if private:
                    _empty_step(optimizer, params, grad_sample_mode)
                continue
            batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id)
            losses.append(take_step(forward, optimizer, batch, mode=mode, autocast=autocast))
            seen += len(chosen)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if private:
            forward._close()  # remove hooks and grad_sample attributes; the model is reused
        model.eval()
    return TrainResult(loss=sum(losses) / len(losses) if losses else float("nan"), steps=steps,
                       sample_rate=q, examples_seen=seen)
