"""Activation recomputation of the decoder layers, exact under Opacus' per-example hooks.

Training keeps every decoder layer's intermediate tensors for the backward pass (SmolLM2,
T = 128: ~5 MB per example per layer, 30 layers). Within ``recomputed_layers`` each layer
runs under ``torch.utils.checkpoint`` (non-reentrant): only its input is kept, and the
backward pass runs the layer's forward once more to get the rest back (Chen et al.,
"Training Deep Nets with Sublinear Memory Cost", 2016). Memory per example drops to one
hidden state per layer plus one layer's intermediates; compute grows by one forward.

Why the recomputation needs care under DP-SGD: Opacus (hooks, functorch and ghost modes)
captures each trainable module's input in a forward hook and pairs it with the output
gradient in a backward hook, counting forwards per parameter (``_forward_counter``). The
recomputation calls the LoRA modules' forward hooks a second time, so a naive checkpoint
captures every activation twice: the stale capture stays in ``module.activations`` and the
counter never returns to zero, so Opacus never promotes the per-example gradients of the
step. Here the recomputation runs with the layer's hooked modules (those holding trainable
parameters: nn.Linear LoRA factors, whose forward does not depend on the mode) switched to
eval mode, which Opacus' capture hook skips (``not module.training``): exactly one capture
per module per step, from the first forward, whose values the recomputation reproduces
(same inputs, same RNG state: checkpoint restores it). tests/slm/test_recompute.py checks
that per-example gradients and a DP-SGD step are the same as without recomputation.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.utils.checkpoint import checkpoint

from slm.unwrap import causal_lm


def decoder_layers(model) -> list[nn.Module]:
    """The repeated blocks of a causal LM (inside PEFT's and Opacus' wrappers)."""
    lm = causal_lm(model)
    layers = getattr(lm.get_decoder(), "layers", None) if hasattr(lm, "get_decoder") else None
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no decoder .layers to recompute")
    return list(layers)


@contextlib.contextmanager
def _hooks_quiet(hooked: list[nn.Module]):
    """The recomputing forward: hooked modules in eval mode, so Opacus captures nothing twice."""
    modes = [m.training for m in hooked]
    for m in hooked:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(hooked, modes):
            m.training = mode


def _checkpointed(layer: nn.Module, forward):
    hooked = [m for m in layer.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]

    def contexts():
        return contextlib.nullcontext(), _hooks_quiet(hooked)

    def run(*args, **kwargs):
        if not layer.training:  # evaluation (or no_grad): nothing to keep, nothing to recompute
            return forward(*args, **kwargs)
        # A KV cache would be written twice (forward and recomputation); training reads none.
        kwargs.update({k: None for k in ("past_key_values", "past_key_value") if k in kwargs})
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextlib.contextmanager
def recomputed_layers(model, enabled: bool = True):
    """Within: every decoder layer of ``model`` recomputes its activations in the backward pass.

    Set up after PEFT has attached the adapter (the hooked modules are the trainable ones
    at entry); undone on exit, so evaluation and later rounds run the plain layers.
    """
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _checkpointed(layer, layer.forward)  # instance attribute: shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
