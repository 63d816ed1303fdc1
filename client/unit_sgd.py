"""Unit-level DP-SGD: sample people, not records; clip each person's gradient as one.

One step (user-level sampling, Charles et al., "Fine-Tuning Large Language Models with
User-Level Differential Privacy", SaTML 2025, Algorithm "ULS"; Chua et al., COLM 2024):

1. every unit (client.units) joins the batch independently with probability
   q = expected units / units (Poisson sampling over units: what the SGM accountant
   assumes, at the UNIT rate);
2. a sampled unit with more than k records contributes k of them, chosen uniformly at
   random without replacement; fewer are all used;
3. its gradient is the MEAN of its chosen records' per-example gradients, clipped to C as
   one vector: adding or removing a whole unit moves the clipped sum by at most C;
4. Gaussian noise N(0, (sigma C)^2) on the sum, divided by the expected number of units.

So the mechanism is the Poisson-subsampled Gaussian over units, and the accountant is the
record-level one with q taken over units. Opacus computes per-example gradients
(``grad_sample``); ``mean_per_unit`` replaces them, per micro-batch, by one row per unit
before Opacus clips and sums. Micro-batches are cut at unit boundaries, so a unit's
records are averaged together (a unit of k records runs in one piece, even when k is
above the physical batch size). Ghost clipping keeps no per-example gradients to average
and is refused for units.

Every draw (the unit mask and the choice of k records) comes from the round's DpRandom.
With one record per unit, no choice is drawn and the mean of one row is that row: the step
is the record-level step, draw for draw.
"""

from __future__ import annotations

import itertools

import torch

from privacy.mechanism.randomness import DpRandom


def sample_units(dp_random: DpRandom, units: list[list[int]], q: float, k: int) -> tuple[list[int], list[int]]:
    """(record indices, their unit's position in the batch) for one step; units kept whole and in order."""
    rows, segments = [], []
    for position, u in enumerate(dp_random.bernoulli(len(units), q).nonzero()[0].tolist()):
        members = units[u]
        if len(members) > k:  # k of them, uniformly without replacement: the k smallest of uniform keys
            keys = dp_random.uniform(len(members))
            members = [members[i] for i in sorted(keys.argsort()[:k].tolist())]
        rows += members
        segments += [position] * len(members)
    return rows, segments


def unit_bounds(segments: list[int], physical_batch_size: int) -> list[int]:
    """Cut points of micro-batches that never split a unit: each piece holds whole units, at most
    ``physical_batch_size`` rows unless one unit alone is larger (0 = one piece)."""
    size = len(segments)
    if physical_batch_size <= 0 or size <= physical_batch_size:
        return [0, size]
    starts = [i for i in range(size) if i == 0 or segments[i] != segments[i - 1]] + [size]
    cuts = [0]
    for start, end in itertools.pairwise(starts):
        if end - cuts[-1] > physical_batch_size and start > cuts[-1]:
            cuts.append(start)
    return cuts + [size]


def mean_per_unit(params, segments: torch.Tensor) -> None:
    """Replace each parameter's per-example gradients (rows) by their mean per unit (one row per unit).

    ``segments[i]`` is row i's unit, numbered 0..U-1 within the micro-batch. Taken in fp32
    (client.train.fp32_grad_samples runs first), so the unit's clipping norm is that of the
    very vector that is clipped and summed.
    """
    units = int(segments.max()) + 1 if len(segments) else 0
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        seg = segments.to(sample.device)
        counts = torch.zeros(units, dtype=sample.dtype, device=sample.device).index_add_(
            0, seg, torch.ones_like(seg, dtype=sample.dtype))
        summed = torch.zeros((units, *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        summed.index_add_(0, seg, sample)
        p.grad_sample = summed / counts.view(-1, *([1] * (sample.dim() - 1)))
