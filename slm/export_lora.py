"""The global adapter as a llama.cpp LoRA adapter (GGUF), read back and applied on a device's base.

A device that already holds the base model needs only the adapter: 0.9 MB (F16) for r=8
on q_proj, v_proj of SmolLM2-135M, against 85-145 MB for a merged quantized model. The
file follows what llama.cpp's ``--lora`` (llama-cpp-python ``lora_path``) loads on top of
a base GGUF, as written by llama.cpp's ``convert_lora_to_gguf.py`` and checked by
``src/llama-adapter.cpp`` (``llama_adapter_lora_init_impl``):

- metadata: ``general.architecture`` = the base's (llama), ``general.type`` = "adapter",
  ``adapter.type`` = "lora", ``adapter.lora.alpha`` (float32); llama.cpp scales the
  update by alpha / rank, rank = lora_a's ne[1], as PEFT scales by lora_alpha / r;
- tensors ``<base tensor name>.lora_a`` / ``.lora_b`` (``blk.3.attn_q.weight.lora_a``):
  numpy (r, in) and (out, r), PEFT's own A and B (gguf-py reverses numpy shapes into
  ggml's ne, so ne = [in, r] and [r, out]: llama.cpp checks ne[0] of lora_a and ne[1] of
  lora_b against the base tensor, and lora_a.ne[1] == lora_b.ne[0]);
- q/k: the converter permutes attn_q / attn_k weights' rows for llama.cpp's rotary
  layout (slm.export.permute_for_llama_cpp). Applied to a LoRA pair, that reshape /
  swapaxes acts on the output rows only, i.e. on B (convert_lora_to_gguf.py
  ``LoraTorchTensor.reshape/permute``: A keeps its shape, B's rows are permuted), so
  permute(W + s B A) = permute(W) + s permute(B) A;
- dtype F16 (F32 would be 1.8 MB; Q8_0 cannot hold B, whose rows of r=8 values are
  shorter than a 32-value Q8_0 block).

On the device (no llama.cpp needed) the adapter is read back from the shipped file
(inverse permutation) and applied the way llama.cpp applies it, unmerged: each adapted
projection returns W x + (alpha / r) B (A x), through forward hooks that leave the base's
weights untouched.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedslm.common.errors import UserError
from slm.export import gguf_name, hf_name, permute_for_llama_cpp, unpermute_from_llama_cpp

ADAPTER_DTYPE = "f16"
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA adapter in HF orientation: {HF module name: (A (r, in), B (out, r))}, scale alpha / r."""

    alpha: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return next(iter(self.pairs.values()))[0].shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT adapter tensors (``...q_proj.lora_A.weight``) -> {``model.layers.0.self_attn.q_proj``: (A, B)}."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise UserError(f"LoRA export: {key} is not a LoRA A/B tensor")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    missing = [module for module, ab in parts.items() if set(ab) != {"A", "B"}]
    if missing:
        raise UserError(f"LoRA export: {missing[0]} lacks its A or B factor")
    return {module: (ab["A"], ab["B"]) for module, ab in sorted(parts.items())}


def write_lora_gguf(state: dict[str, torch.Tensor], *, alpha: float, config, out: Path, name: str) -> None:
    """Write PEFT adapter tensors as a llama.cpp LoRA adapter for a base with this HF ``config``."""
    from gguf import GGUFType, GGUFWriter, Keys, LlamaFileType

    if config.model_type != "llama":
        raise UserError("LoRA GGUF export supports Llama-architecture bases (the default SmolLM2)")
    writer = GGUFWriter(str(out), arch="llama")
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    for module, (a, b) in lora_pairs(state).items():
        target = gguf_name(module + ".weight")
        a = a.detach().to(torch.float32).numpy()  # (r, in)
        b = b.detach().to(torch.float32).numpy()  # (out, r)
        heads = _heads(target, config)
        if heads:
            b = permute_for_llama_cpp(b, heads)  # B carries the output rows (see module docstring)
        writer.add_tensor(target + ".lora_a", a.astype(np.float16))
        writer.add_tensor(target + ".lora_b", b.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_lora_gguf(path: Path, config) -> LoraFile:
    """The inverse of write_lora_gguf: a llama.cpp LoRA adapter file back in HF orientation."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents() if key in reader.fields else None

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise UserError(f"shipped adapter {Path(path).name}: not a GGUF LoRA adapter (general.type, adapter.type)")
    if field("general.architecture") != config.model_type:
        raise UserError(f"shipped adapter {Path(path).name}: architecture {field('general.architecture')} "
                        f"does not match the base's {config.model_type}")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
               for t in reader.tensors}
    pairs = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_a"):
            continue
        target = key[: -len(".lora_a")]
        a, b = tensors[key], tensors[target + ".lora_b"]
        heads = _heads(target, config)
        if heads:
            b = unpermute_from_llama_cpp(b, heads)
        pairs[hf_name(target)[: -len(".weight")]] = (torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
    if not pairs:
        raise UserError(f"shipped adapter {Path(path).name}: no LoRA tensors")
    return LoraFile(alpha=float(field("adapter.lora.alpha")), pairs=pairs)


def _heads(target: str, config) -> int | None:
    if target.endswith("attn_q.weight"):
        return config.num_attention_heads
    if target.endswith("attn_k.weight"):
        return config.num_key_value_heads
    return None


_applying = threading.Lock()  # hooks live on the (shared, cached) base: one adapter at a time


@contextmanager
def applied(model, lora: LoraFile):
    """``model`` (a plain HF Llama) computing W x + scale * B (A x) at every adapted projection.

    llama.cpp's unmerged application (llm_build_lora_mm); the base's weights are never
    written, so a cached base stays the device's base.
    """
    modules = dict(model.named_modules())
    missing = [name for name in lora.pairs if name not in modules]
    if missing:
        raise UserError(f"shipped adapter: the base has no module {missing[0]} (wrong base model?)")

    def hook(a, b):
        def add_update(module, inputs, output):
            x = inputs[0]
            return output + lora.scale * (x @ a.to(x.dtype).T) @ b.to(x.dtype).T
        return add_update

    with _applying:
        handles = [modules[name].register_forward_hook(hook(a, b)) for name, (a, b) in lora.pairs.items()]
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
