"""The three task kinds: how a record becomes tokens, which tokens carry loss, and what is measured.

- ``sft`` (instruction tuning): prompt through the chat template, then the response and
  the end-of-turn token. Only response tokens carry loss.
- ``label`` (label scoring): the text as the user turn, the verbalizer of the label as the
  assistant turn (loss on it only). Accuracy = argmax over labels of the log-likelihood
  of each verbalizer.
- ``next-word``: plain text, loss on every token; perplexity and next-token top-1/top-3.

Privacy unit: one encoded example = one record. Per-example loss is the mean over that
example's loss tokens, and a batch's loss is the mean of per-example losses, which is
what Opacus assumes with ``loss_reduction="mean"`` when it rescales per-sample gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slm.errors import UserError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


@dataclass(frozen=True)
class Task:
    kind: str
    max_length: int
    prompt_field: str = "question"
    response_field: str = "answer"
    text_field: str = "text"
    label_field: str = "label"
    verbalizers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: dict) -> "Task":
        verbalizers = parse_verbalizers(config["data.verbalizers"]) if config["data.task"] == "label" else ()
        return cls(
            kind=config["data.task"],
            max_length=config["model.max-length"],
            prompt_field=config["data.prompt-field"],
            response_field=config["data.response-field"],
            text_field=config["data.text-field"],
            label_field=config["data.label-field"],
            verbalizers=verbalizers,
        )


def parse_verbalizers(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, word = item.partition("=")
        if not sep or not value.strip() or not word.strip():
            raise UserError(f"config key 'data.verbalizers': {item!r} is not value=word")
        pairs.append((value.strip(), word.strip()))
    if len(pairs) < 2:
        raise UserError("config key 'data.verbalizers': label scoring needs at least two value=word pairs")
    return tuple(pairs)


def _prompt_ids(tokenizer, text: str, budget: int) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)[-budget:] if len(ids) > budget else list(ids)


def _completion_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _value(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"record {where}: field '{field}' is empty")
    return str(value)


def encode(task: Task, tokenizer, record: dict, where: str = "") -> Example:
    """One record -> token ids and loss labels, at most ``task.max_length`` tokens."""
    if task.kind == "next-word":
        ids = tokenizer(_value(record, task.text_field, where), add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
        ids = ids[: task.max_length]
        return Example(ids, [IGNORE] + ids[1:])
    if task.kind == "sft":
        prompt, completion = _value(record, task.prompt_field, where), _value(record, task.response_field, where)
    else:
        prompt, completion = _value(record, task.text_field, where), verbalize(task, record, where)
    # Keep at least half of the window for the completion: it is the only part with loss.
    prompt_ids = _prompt_ids(tokenizer, prompt, task.max_length // 2)
    completion_ids = _completion_ids(tokenizer, completion)[: task.max_length - len(prompt_ids)]
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def verbalize(task: Task, record: dict, where: str) -> str:
    value = _value(record, task.label_field, where)
    for label, word in task.verbalizers:
        if label == value:
            return word
    raise UserError(f"record {where}: label {value!r} has no verbalizer in data.verbalizers")


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


def summarize(loss_sum: float, tokens: int) -> dict[str, float]:
    mean = loss_sum / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}
