"""Local DP-SGD on the LoRA adapter (Opacus), with Poisson sampling.

Each step includes every training record independently with probability
q = expected_batch / records (Poisson sampling, which is what the accountants assume;
never replaced by shuffling). Opacus computes per-example gradients of the adapter
(hooks mode), clips each to ``clip_norm``, sums, adds N(0, (sigma * C)^2) and divides by
the EXPECTED batch size. An empty Poisson batch still takes a step: the released noise
is part of the mechanism.

Randomness (sampling and noise) comes from an explicit generator seeded per client and
round. secure_mode is off: Opacus' cryptographically secure RNG needs torchcsprng, which
is not installable here; reports say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from slm.errors import UserError
from slm.tasks import Task, collate, encode, per_example_loss


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


def train_adapter(model, tokenizer, task: Task, records: list[dict], *, steps: int, batch_size: int, lr: float,
                  noise_multiplier: float | None, clip_norm: float, seed: int,
                  make_optimizer=None) -> TrainResult:
    """Run ``steps`` optimizer steps; DP-SGD when ``noise_multiplier`` is not None.

    ``make_optimizer(params)`` replaces the default Adam(lr) (tests use plain SGD to
    compare an update with hand-computed clipped gradients).
    """
    examples = [encode(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(records)]
    q = sample_rate(batch_size, len(examples))
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if make_optimizer else torch.optim.Adam(params, lr=lr)
    private = noise_multiplier is not None
    forward = model
    if private:
        forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                                expected_batch_size=batch_size, generator=generator)
    model.train()
    losses, seen = [], 0
    try:
        for _ in range(steps):
            chosen = (torch.rand(len(examples), generator=generator) < q).nonzero().flatten().tolist()
            optimizer.zero_grad(set_to_none=True)
            if not chosen:
                if private:
                    for p in params:  # an empty batch: zero per-example grads, noise only
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    optimizer.step()
                continue
            batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id)
            logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = per_example_loss(logits, batch["labels"]).mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            seen += len(chosen)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if private:
            forward._close()  # remove hooks and grad_sample attributes; the model is reused
        model.eval()
    return TrainResult(loss=sum(losses) / len(losses) if losses else float("nan"), steps=steps,
                       sample_rate=q, examples_seen=seen)
