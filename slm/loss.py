"""The training loss with logits only where the loss is, in checkpointed chunks.

A causal LM's head maps every position's last hidden state to V logits (SmolLM2: V =
49,152, so B=8 x T=128 positions are 201 MB of fp32 logits, kept for the backward pass,
and as much again for their gradient). Only the positions whose NEXT token carries loss
need them (sft / label: the response; prompts and padding carry none). So the decoder
body runs to the last hidden states (B, T, H), the rows of the loss positions are picked
out (N, H), and the frozen head is applied to them ``CHUNK`` rows at a time, each chunk
under ``torch.utils.checkpoint``: the backward recomputes a chunk's logits instead of
keeping them, so at most one chunk of logits (CHUNK x V) lives at any time.

The definition is slm.batch.per_example_loss exactly: each example's loss is the mean
of the next-token cross entropies (in fp32) over its loss tokens. Per-example DP-SGD stays
exact under Opacus: its hooks sit on the LoRA layers inside the decoder body, which is
called as a module here (hooks fire on any call of a hooked module); the head is frozen
and hook-free (a trained head is refused: its per-example gradients would be computed per
chunk, not per example, and its forward would run twice).

Holds for causal LMs whose logits are ``lm_head(last hidden state)`` (Llama family, SmolLM2,
also with a tied head and the int8 base of slm/int8_base.py); models that scale or cap the
logits are refused with one line rather than trained on a different loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedslm.common.errors import UserError
from slm.frozen_prefix import run_body
from slm.tasks import IGNORE
from slm.unwrap import causal_lm

CHUNK = 256  # loss positions per head application: 256 x 49,152 fp32 logits = 50 MB


def body_and_head(model):
    """(decoder body returning last hidden states, frozen output head) of a causal LM."""
    lm = causal_lm(model)
    config = lm.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        raise UserError(f"config key 'model.name': {type(lm).__name__} scales its logits; the chunked loss "
                        "(slm/loss.py) supports causal LMs whose logits are lm_head(hidden) only")
    head = lm.get_output_embeddings()
    if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):  # evaluation may keep it
        raise UserError("config key 'lora.target-modules': the output head cannot be trained (the loss applies it "
                        "to loss positions only, in chunks, so its per-example gradients would be wrong)")
    return lm.get_decoder(), head


def loss_positions(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """(hidden rows (N, H), next-token targets (N,), example of each row (N,), head) of a batch's loss tokens.

    Also for evaluation: scoring a label or top-k of the next word needs the head on these
    rows only (``head(rows)`` in chunks, under torch.no_grad()).
    """
    _, head = body_and_head(model)
    hidden = run_body(model, batch)  # (B, T, H); from the kept frozen layers' output when the batch has it
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    example, position = (targets != IGNORE).nonzero(as_tuple=True)  # (N,), (N,)
    return hidden[:, :-1][example, position], targets[example, position], example, head


def _chunk_losses(head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="none")  # logits (n, V) live only in here


def token_losses(head, rows: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Next-token cross entropy (fp32) of each loss row, (N,); logits of one chunk at a time."""
    if not rows.requires_grad:  # evaluation: nothing to recompute
        return torch.cat([_chunk_losses(head, rows[s:s + chunk], targets[s:s + chunk])
                          for s in range(0, len(rows), chunk)] or [rows.new_zeros(0, dtype=torch.float32)])
    return torch.cat([checkpoint(_chunk_losses, head, rows[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
                      for s in range(0, len(rows), chunk)] or [rows.new_zeros(0, dtype=torch.float32)])


def example_loss_sums(model, batch: dict, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each example's token losses (B,), its number of loss tokens (B,))."""
    rows, targets, example, head = loss_positions(model, batch)
    size = len(batch["input_ids"])
    sums = torch.zeros(size, dtype=torch.float32, device=rows.device)
    if not len(rows) and rows.requires_grad:
        # No loss token in the whole batch: the empty selection (sum exactly 0) keeps the
        # body in the graph, so backward still gives (zero) per-example gradients as the
        # full-logits loss does, instead of failing on a loss without a graph.
        sums = sums + rows.float().sum()
    sums = sums.index_add(0, example, token_losses(head, rows, targets, chunk))
    counts = torch.bincount(example, minlength=size)
    return sums, counts


def per_example_loss(model, batch: dict, chunk: int = CHUNK) -> torch.Tensor:
    """Mean loss over each example's loss tokens, (B,): slm.batch.per_example_loss without full logits."""
    sums, counts = example_loss_sums(model, batch, chunk)
    return sums / counts.clamp_min(1)


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The same (B,) loss through the model's full (B, T, V) logits: the reference the chunked loss is
    checked against, and the "before" of its benchmark."""
    from slm.batch import per_example_loss as from_logits

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return from_logits(logits, batch["labels"])
