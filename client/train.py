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

Virtual steps: a logical (Poisson) batch of any size is processed in physical micro-batches
of at most ``physical_batch_size`` examples. Each micro-batch's per-example gradients are
clipped and added to Opacus' running clipped sum (``signal_skip_step``: clip and
accumulate, no noise, no update); after the last one the noise N(0, (sigma C)^2) is added
ONCE and the sum divided by the expected batch size once. So the released update, the
sensitivity C and the accounting are those of the one-piece step (Abadi et al. 2016,
Algorithm 1: one noise draw per lot); only the memory is bounded by the physical batch.
The loss computes logits only at loss positions, in checkpointed chunks (slm/loss.py).

Randomness (sampling and noise): every draw of a round comes from one
privacy.mechanism.randomness.DpRandom, a ChaCha20 keystream keyed by 256 bits of OS
entropy (a cryptographic generator: released noise reveals nothing of the noise still to
come). No torch or NumPy generator is used anywhere in the DP path: the Poisson mask is
DpRandom.bernoulli and the noise DpRandom.normal (float64 Box-Muller), drawn on the CPU
and moved to the parameter's device (_CsprngNoise), so the released noise for a given key
is the same on every device. Opacus' own ``secure_mode`` (torchcsprng) is not needed.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from client.unit_sgd import mean_per_unit, sample_units, unit_bounds
from client.units import sample_rate
from fedslm.common.errors import UserError
from privacy.mechanism.randomness import DpRandom, seed_key
from slm.batch import collate
from slm.frozen_prefix import with_prefix
from slm.loss import per_example_loss
from slm.tasks import Example, Task, encode

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


def autocast_context(autocast: str, device: torch.device | str = "cpu"):
    """bf16 autocast of the forward pass on the model's device (matmuls in bf16, losses and LoRA factors in fp32)."""
    if autocast == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
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


class _CsprngNoise:
    """Opacus' add_noise with the noise from the round's DpRandom (set as ``dp_random``).

    Opacus 1.6.0 ``add_noise`` draws ``torch.normal`` from a torch generator (a Mersenne
    Twister on the CPU, a Philox on a GPU), whose state a coordinator can reconstruct from
    released noise (privacy.mechanism.randomness). Here each parameter's noise
    N(0, (sigma C)^2) is drawn in float64 from the ChaCha20 keystream, rounded to the summed
    gradient's dtype and moved to its device; the rest is Opacus' own step (the processed
    flags, then ``scale_grad`` divides by the expected batch size).
    """

    dp_random: DpRandom

    def add_noise(self):
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)  # as Opacus' ghost optimizer
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = torch.from_numpy(self.dp_random.normal(p.summed_grad.shape, sigma * self.max_grad_norm))
            p.grad = (p.summed_grad + noise.to(p.summed_grad.device, p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


class _DPOptimizer(_CsprngNoise, DPOptimizer):
    pass


class _DPOptimizerGhost(_CsprngNoise, DPOptimizerFastGradientClipping):
    pass


def make_private(model, optimizer, *, mode: str, noise_multiplier: float, clip_norm: float, batch_size: int,
                 dp_random: DpRandom):
    """(forward module, DP optimizer) for a grad-sample mode; ``forward._close()`` undoes it."""
    if mode not in GRAD_SAMPLE_MODES:
        raise UserError(f"config key 'train.grad-sample-mode': {mode!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}")
    if mode == "ghost":
        forward = _GhostClippingFp32Norms(model, batch_first=True, loss_reduction="mean",
                                          max_grad_norm=clip_norm, use_ghost_clipping=True)
        optimizer = _DPOptimizerGhost(optimizer, noise_multiplier=noise_multiplier,
                                       max_grad_norm=clip_norm, expected_batch_size=batch_size,
                                       loss_reduction="mean")
        optimizer.dp_random = dp_random
        return forward, optimizer
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    optimizer = _DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                             expected_batch_size=batch_size)
    optimizer.dp_random = dp_random
    return forward, optimizer


def micro_batches(batch: dict, physical_batch_size: int, bounds: list[int] | None = None) -> list[dict]:
    """A logical batch cut into consecutive pieces of at most ``physical_batch_size`` rows (0 = one piece),
    or at the given cut points ``bounds`` (unit-level DP: client.unit_sgd.unit_bounds, whole units per piece).

    Each piece is cut to its own longest example (right padding: the columns dropped are
    padding of every row in it, which neither attention nor the loss sees).
    """
    size = len(batch["input_ids"])
    if bounds is None:
        if physical_batch_size <= 0 or size <= physical_batch_size:
            return [batch]
        bounds = [*range(0, size, physical_batch_size), size]
    if len(bounds) <= 2:
        return [batch]
    pieces = []
    for start, end in itertools.pairwise(bounds):
        piece = {k: v[start:end] for k, v in batch.items()}
        width = max(int(piece["attention_mask"].sum(dim=1).max()), 1)
        pieces.append({k: v[:, :width] for k, v in piece.items()})
    return pieces


def take_step(forward, optimizer, batch: dict, *, mode: str | None, autocast: str = "none",
              physical_batch_size: int = 0, loss=per_example_loss, segments: list[int] | None = None) -> float:
    """One logical optimizer step on one batch; ``mode`` None = non-private. Returns the batch loss.

    The batch runs in micro-batches of at most ``physical_batch_size`` examples. Under DP
    every micro-batch but the last is clipped and accumulated only
    (``signal_skip_step``); the last one's ``step`` adds the noise once, divides by the
    expected batch once and updates (Opacus DPOptimizer.pre_step). Non-private, the
    micro-batch gradients sum to that of the mean loss over the whole batch.
    Shared by training and the DP-overhead benchmark, so the benchmark times exactly this.
    ``loss(forward, batch)`` -> (B,) is slm.loss.per_example_loss (benchmarks pass the full-logits one).
    ``segments`` (unit-level DP, client.unit_sgd): row i's unit; each unit's rows are averaged into one
    gradient before clipping, and micro-batches hold whole units.
    """
    device = next(p for group in optimizer.param_groups for p in group["params"]).device
    optimizer.zero_grad(set_to_none=True)
    bounds = unit_bounds(segments, physical_batch_size) if segments is not None else None
    pieces = micro_batches(batch, physical_batch_size, bounds)
    size, total = len(batch["input_ids"]), 0.0
    for i, piece in enumerate(pieces):
        with autocast_context(autocast, device):
            piece = {k: v.to(device) for k, v in with_prefix(forward, piece).items()}  # lora.layers: frozen part kept
            losses = loss(forward, piece)
        if mode == "ghost":
            DPTensorFastGradientClipping(forward, optimizer, losses, "mean").backward()
        elif mode is None:
            (losses.sum() / size).backward()  # accumulates to the gradient of the whole batch's mean loss
        else:
            losses.mean().backward()
            fp32_grad_samples(optimizer)  # clipping norms in fp32, also under bf16 autocast
            if segments is not None:
                start = bounds[i]
                piece_segments = torch.tensor(segments[start:start + len(losses)])
                mean_per_unit(optimizer.params, piece_segments - piece_segments.min())
        total += float(losses.detach().sum())
        if mode is not None and i < len(pieces) - 1:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()  # clip and add to the clipped sum; no noise, no update
            optimizer.zero_grad(set_to_none=True)  # per-example gradients only: the clipped sum is kept
    optimizer.step()
    return total / size


def _empty_step(optimizer, params, mode: str) -> None:
    """An empty Poisson batch: zero clipped sum, noise only."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def lora_snapshot(model) -> tuple[dict, dict]:
    """Copies of the adapter tensors that must train and of the LoRA factors that must not (FFA's A)."""
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    return ({n: p.detach().clone() for n, p in lora.items() if p.requires_grad},
            {n: p.detach().clone() for n, p in lora.items() if not p.requires_grad})


def check_first_update(model, before: tuple[dict, dict], *, noised: bool) -> None:
    """After the first optimizer step: frozen LoRA factors unchanged and, when noise was released, every
    trainable one changed.

    The failure this catches is Opacus issue #820: with the base moved to a device after
    PEFT wrapped it (or an optimizer built over other tensors than the model's), training
    runs and the adapter silently never changes. A noised step moves every coordinate of
    every trained tensor (a continuous Gaussian), so "unchanged" cannot be bad luck.
    """
    trained, frozen = before
    now = dict(model.named_parameters())
    stuck = [n for n, v in trained.items() if noised and torch.equal(now[n].detach(), v)]
    moved = [n for n, v in frozen.items() if not torch.equal(now[n].detach(), v)]
    if stuck or moved:
        what = f"{stuck[0]} did not change" if stuck else f"frozen {moved[0]} changed"
        raise RuntimeError(f"LoRA update check after the first step: {what} (the optimizer does not update the "
                           "model's adapter: was the model moved to its device after PEFT wrapped it?)")


def train_adapter(model, tokenizer, task: Task, records: list[dict], *, steps: int, batch_size: int, lr: float,
                  noise_multiplier: float | None, clip_norm: float, seed: bytes | int,
                  make_optimizer=None, grad_sample_mode: str = "hooks", autocast: str = "none",
                  physical_batch_size: int = 0, on_step=None, units: list[list[int]] | None = None,
                  max_records_per_unit: int = 1) -> TrainResult:
    """Run ``steps`` optimizer steps; DP-SGD when ``noise_multiplier`` is not None.

    ``seed``: a 32-byte DpRandom key (a site passes fresh OS entropy), or an int for a
    reproducible run (tests, benchmarks), hashed into a key (privacy.mechanism.randomness).
    ``make_optimizer(params)`` replaces the default Adam(lr) (tests use plain SGD to
    compare an update with hand-computed clipped gradients).
    ``physical_batch_size``: most examples per forward/backward pass (0 = the whole Poisson
    batch at once); the update is the same (virtual steps, see the module docstring).
    The model runs where its parameters are (slm.lora.attach places it); batches follow.
    ``on_step(step, steps)`` is called after each logical step (1-based): a site's progress lines.
    ``records`` may already be encoded (``Example``): a site encodes them before it reserves its spend.
    ``units`` (unit-level DP, client.unit_sgd): each privacy unit's record indices; then ``batch_size``
    is the expected number of UNITS, q is taken over units, and each sampled unit gives at most
    ``max_records_per_unit`` records, whose mean gradient is clipped as one.
    """
    examples = [r if isinstance(r, Example) else encode(task, tokenizer, r, where=f"#{i}")
                for i, r in enumerate(records)]
    q = (sample_rate(batch_size, len(examples)) if units is None
         else sample_rate(batch_size, len(units), what="units"))
    if units is not None and noise_multiplier is not None and grad_sample_mode == "ghost":
        raise UserError("config key 'train.grad-sample-mode' = ghost cannot train with a privacy unit: ghost "
                        "clipping keeps only per-example gradient norms, and a unit's clipped gradient is the "
                        "mean of its records' gradients; use hooks or functorch")
    autocast_context(autocast)  # reject a bad value before any step
    if physical_batch_size < 0:
        raise UserError("config key 'train.physical-batch-size': must be 0 (one piece) or a positive number")
    if noise_multiplier is not None and grad_sample_mode == "ghost" and autocast == "bf16":
        raise UserError("config keys 'train.grad-sample-mode' = ghost and 'train.autocast' = bf16 do not go together "
                        "under DP: ghost clipping recomputes the clipped sum in a second bf16 backward pass, so a "
                        "clipped example's gradient can exceed the clip norm (measured: by up to 0.15%); use hooks "
                        "or functorch with bf16")
    dp_random = DpRandom(seed if isinstance(seed, bytes) else seed_key(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if make_optimizer else torch.optim.Adam(params, lr=lr)
    private = noise_multiplier is not None
    forward = model
    if private:
        forward, optimizer = make_private(model, optimizer, mode=grad_sample_mode, noise_multiplier=noise_multiplier,
                                          clip_norm=clip_norm, batch_size=batch_size, dp_random=dp_random)
    mode = grad_sample_mode if private else None
    noised = private and noise_multiplier > 0 and all(group["lr"] > 0 for group in optimizer.param_groups)
    first = lora_snapshot(model)
    model.train()
    losses, seen = [], 0
    try:
        for step in range(steps):
            segments = None
            if units is None:
                chosen = dp_random.bernoulli(len(examples), q).nonzero()[0].tolist()  # Poisson: each record, prob q
            else:  # Poisson over units, at most k records of each (client.unit_sgd)
                chosen, segments = sample_units(dp_random, units, q, max_records_per_unit)
            if not chosen:
                optimizer.zero_grad(set_to_none=True)
                if private:
                    _empty_step(optimizer, params, grad_sample_mode)
            else:
                batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id)
                losses.append(take_step(forward, optimizer, batch, mode=mode, autocast=autocast,
                                        physical_batch_size=physical_batch_size, segments=segments))
                seen += len(chosen)
            if step == 0:
                check_first_update(model, first, noised=noised)
                first = None
            if on_step is not None:
                on_step(step + 1, steps)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if private:
            forward._close()  # remove hooks and grad_sample attributes; the model is reused
        model.eval()
    return TrainResult(loss=sum(losses) / len(losses) if losses else float("nan"), steps=steps,
                       sample_rate=q, examples_seen=seen)
