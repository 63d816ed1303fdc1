"""The transformers model inside the wrappers training puts around it (Opacus, PEFT)."""

from __future__ import annotations


def causal_lm(model):
    """The transformers causal LM inside Opacus' GradSampleModule and PEFT's wrappers."""
    inner = model
    while hasattr(inner, "_module"):  # GradSampleModule(...)
        inner = inner._module
    if hasattr(inner, "get_base_model"):  # PeftModel -> the LoRA-injected base
        inner = inner.get_base_model()
    return inner
