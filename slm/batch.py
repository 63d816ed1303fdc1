"""A batch of encoded examples as tensors, and its next-token losses.

Kept apart from slm/tasks.py (records to token ids) so that checking a user's file and
template imports no torch: a bad file is reported in well under a second, not after the
seconds torch takes to import.

A record's loss is the mean of its next-token cross entropies over its loss tokens (the
tokens not marked IGNORE); slm/loss.py computes the same in chunks for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slm.tasks import IGNORE, Example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch."""
    width = max((len(e.input_ids) for e in examples), default=1)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token loss and a mask of the tokens that carry loss. Both (B, T-1)."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != IGNORE
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return losses * mask, mask


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over each example's loss tokens, shape (B,)."""
    losses, mask = token_losses(logits, labels)
    return losses.sum(dim=1) / mask.sum(dim=1).clamp_min(1)
