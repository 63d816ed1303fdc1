"""Adapters in the top layers only, and the frozen layers below them run once per record.

With ``lora.layers`` = N, PEFT puts the adapters in the top N decoder layers only. Every
layer below the first adapted one is frozen and adapter-free, so what it outputs for a
record is a function of the record's tokens and the frozen base alone: the same at every
step and in every round. It is computed once (no graph), kept, and each later pass runs
the adapted layers only, from the kept hidden states (``inputs_embeds`` of the decoder
with its layer list cut to the adapted ones). Forward and backward then cost N/L of the
decoder (SmolLM2: L = 30), and the eval records, seen every round, cost it too.

Why DP-SGD is unchanged: an adapter's per-example gradient depends on the layers below it
only through their output for that example, which is the very numbers kept here; Opacus'
hooks sit on the adapted layers, which run as before. tests/slm/test_frozen_prefix.py
checks losses and per-example gradients against the full model.

Rows are right-padded and causal, so a record's hidden states do not depend on the batch
it was computed in (up to float reassociation); they are kept by token sequence and autocast
dtype (training under ``train.autocast=bf16`` runs the frozen layers in bf16 too, as the
whole model would; evaluation in fp32 keeps its own), per model, with a byte budget (least
recently used first out). The cut must sit below the adapters
only: ``cut`` finds the first layer holding a trainable parameter, so a spec whose adapters
also sit lower (or in the embedding) simply gets a smaller cut (0: no prefix at all).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn

from slm.unwrap import causal_lm

CACHE_BYTES = 1 << 30  # kept hidden states per model: SST-2, 8,000 records of ~40 tokens at H = 576 is ~0.74 GiB


def cut(model) -> int:
    """Index of the first decoder layer with a trainable parameter (0 when the embedding trains or none does)."""
    decoder = causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)  # Llama-family decoders; elsewhere the whole model always runs
    if layers is None or not hasattr(decoder, "norm"):
        return 0
    if any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return 0
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return 0


@contextlib.contextmanager
def layer_range(decoder, start: int, stop: int | None = None, *, final_norm: bool = True):
    """Within: ``decoder`` runs layers[start:stop] only (and without its final norm if asked)."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield decoder
    finally:
        decoder.layers, decoder.norm = layers, norm


class PrefixCache:
    """Hidden states entering layer ``cut`` per token sequence, for one model; LRU within a byte budget."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self.kept.get(key)
        if value is not None:
            self.kept.move_to_end(key)
        return value

    def put(self, key: tuple, value) -> None:
        """Keep ``value`` (a tensor or a tuple of tensors / None) unless it alone is over the budget."""
        size = _bytes(value)
        if size > self.budget or key in self.kept:
            return
        while self.used + size > self.budget:
            _, old = self.kept.popitem(last=False)
            self.used -= _bytes(old)
        self.kept[key] = value
        self.used += size


def _bytes(value) -> int:
    if isinstance(value, tuple):
        return sum(_bytes(v) for v in value)
    return 0 if value is None else value.numel() * value.element_size()


def kept_rows(model) -> PrefixCache:
    """The model's kept frozen-layer outputs (one cache per model: training, evaluation and label scoring share it)."""
    lm = causal_lm(model)
    cache = getattr(lm, "_fedslm_prefix_cache", None)
    if cache is None:
        cache = PrefixCache()
        lm._fedslm_prefix_cache = cache
    return cache


@torch.no_grad()
def _compute(decoder, at: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with layer_range(decoder, 0, at, final_norm=False):
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def with_prefix(model, batch: dict) -> dict:
    """``batch`` plus ``prefix_hidden`` (B, T, H): the hidden states entering the first adapted layer.

    Unchanged when the model has no frozen layers below its adapters. Rows not kept yet are
    computed together, in one pass of the frozen layers, and kept (within the byte budget).
    """
    at = cut(model)
    if at == 0:
        return batch
    decoder, cache = causal_lm(model).get_decoder(), kept_rows(model)
    device = next(p.device for p in decoder.parameters())
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    keys = [(at, precision, *row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths)]
    rows = [cache.get(key) for key in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        width = max(lengths[i] for i in missing)
        hidden = _compute(decoder, at, batch["input_ids"][missing, :width].to(device),
                          batch["attention_mask"][missing, :width].to(device))
        for row, i in enumerate(missing):
            rows[i] = hidden[row, : lengths[i]].clone()
            cache.put(keys[i], rows[i])
    prefix = rows[0].new_zeros((len(rows), batch["input_ids"].shape[1], rows[0].shape[-1]))
    for i, row in enumerate(rows):
        prefix[i, : len(row)] = row
    return {**batch, "prefix_hidden": prefix}


def run_body(model, batch: dict) -> torch.Tensor:
    """Last hidden states (B, T, H) of the decoder: from ``prefix_hidden`` through the adapted layers
    when the batch has it, else the whole decoder from the tokens."""
    decoder = causal_lm(model).get_decoder()
    if "prefix_hidden" not in batch:
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state  # a KV cache would only hold memory
    with layer_range(decoder, cut(model)):
        return decoder(inputs_embeds=batch["prefix_hidden"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state
