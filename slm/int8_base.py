"""The phone profile: LoRA on top of an int8 base, to cut a client's memory by ~3-4x.

A client only trains the adapter; the base is frozen. So the base need not be fp32: every
Linear and the token embedding are stored as int8 with one fp32 scale per output channel
(symmetric, scale = max|w| / 127 of the row) and dequantized on the fly, in slices of rows,
inside the matmul. The backward pass (needed for the gradient w.r.t. the layer input, which
flows to the LoRA factors below) re-dequantizes instead of keeping a fp32 copy: a plain
``F.linear(x, dequantized)`` would make autograd hold every layer's fp32 weight until the
backward pass, i.e. bring the fp32 model back into memory.

The weights are streamed from the HF directory's safetensors file(s) into a model skeleton
built on the meta device (plain reads, no mmap: mapped pages would count in the resident
set); a 2-D weight is read and quantized a slice of rows at a time (StoredTensor), so
neither the fp32 model nor one whole fp32 matrix (the 113 MB embedding) exists in memory.

PEFT wraps the int8 target layers with its own LoRA ``Linear`` (registered as a custom
module: it only needs ``in_features``/``out_features`` and the base layer's forward).
Opacus' GradSampleModule only hooks modules with trainable parameters; the int8 modules
hold buffers only, so DP-SGD sees exactly the LoRA factors, as with the fp32 base.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedslm.common.errors import UserError

BASE_QUANTS = ("none", "int8")
_SLICE_ELEMENTS = 1 << 22  # rows dequantized at once: <= 16 MB of fp32 temporaries


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 weight, fp32 scale of shape (rows, 1)).

    Row slice by row slice, so the fp32 temporaries stay small even for the embedding;
    ``weight`` may be a StoredTensor, whose rows are then read from the file slice by slice
    (the full-precision matrix never exists in memory).
    """
    weight = weight.detach() if isinstance(weight, torch.Tensor) else weight
    qweight = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty((weight.shape[0], 1), dtype=torch.float32)
    for s in _row_slices(qweight):
        rows = weight[s].to(torch.float32)
        scale[s] = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        qweight[s] = torch.round(rows / scale[s]).clamp_(-127, 127).to(torch.int8)
    return qweight, scale


def _row_slices(qweight: torch.Tensor):
    step = max(1, _SLICE_ELEMENTS // qweight.shape[1])
    return [slice(i, min(i + step, qweight.shape[0])) for i in range(0, qweight.shape[0], step)]


class _Scratch(threading.local):
    """One dequantization buffer per thread, device and dtype, reused by every slice of every matmul.

    A fresh fp32 slice per matmul costs a page fault per 4 KiB page once freed memory goes back
    to the OS (model.return-freed-memory, slm/allocator.py): ~1 GB of new pages per SmolLM2
    forward pass, most of the phone profile's step time (BENCHMARKS.md, phone memory). A slice
    is consumed by the next op before the buffer is written again (ops on one thread, or one
    CUDA stream, run in order), so reuse is safe.
    """

    def __init__(self):
        self.buffers: dict = {}

    def dequantize(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (qweight.device, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < qweight.numel():
            buffer = torch.empty(max(_SLICE_ELEMENTS, qweight.numel()), dtype=dtype, device=qweight.device)
            self.buffers[key] = buffer
        out = buffer[: qweight.numel()].view(qweight.shape)
        return torch.mul(qweight, scale.to(dtype), out=out)


_scratch = _Scratch()


class _Int8MatMul(torch.autograd.Function):
    """y = x W^T with W = qweight * scale, dequantized slice by slice in both directions."""

    @staticmethod
    def forward(ctx, x, qweight, scale):
        ctx.save_for_backward(qweight, scale)
        out = x.new_empty((*x.shape[:-1], qweight.shape[0]))  # filled slice by slice: no concatenation copy
        for s in _row_slices(qweight):
            out[..., s] = F.linear(x, _scratch.dequantize(qweight[s], scale[s], x.dtype))
        return out

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            for s in _row_slices(qweight):
                part = grad[..., s] @ _scratch.dequantize(qweight[s], scale[s], grad.dtype)
                grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


class Int8Linear(nn.Module):
    """A frozen Linear stored as int8 + per-output-channel scale (buffers, no parameters)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        return cls(*quantize_rows(weight), bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.scale

    def forward(self, x):
        y = _Int8MatMul.apply(x, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """A frozen embedding table as int8 rows + per-row scale (the same layout as the tied output layer)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, ids):
        return self.qweight[ids].to(torch.float32) * self.scale[ids]


def peft_custom_modules() -> dict:
    """For ``LoraConfig._register_custom_module``: PEFT's own LoRA Linear wraps an Int8Linear."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {Int8Linear: LoraLinear}


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise UserError(f"model.base-quant int8: {path} has no model.safetensors")
    return [single]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class StoredTensor:
    """A tensor's place in an open safetensors file; rows are read on demand (``t[a:b]``, ``t.read()``)."""

    def __init__(self, handle, offset: int, dtype: torch.dtype, shape: list[int]):
        self.handle, self.offset, self.dtype, self.shape = handle, offset, dtype, torch.Size(shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        row_bytes = self.shape[1:].numel() * self.dtype.itemsize
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self.handle.seek(self.offset + start * row_bytes)
        # readinto fills the tensor's own memory: one copy of the bytes, not two (read() + a buffer)
        if self.handle.readinto(out.view(torch.uint8).numpy().reshape(-1)) != out.numel() * self.dtype.itemsize:
            raise UserError(f"{self.handle.name}: truncated tensor data")
        return out

    def read(self) -> torch.Tensor:
        if not self.shape:  # a scalar: one row of one element
            return StoredTensor(self.handle, self.offset, self.dtype, [1])[:].reshape(())
        return self[:]


def stored_tensors(file: Path):
    """Yield (name, StoredTensor) of a safetensors file; the file stays open while the caller reads them."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise UserError(f"{file}: tensor {name} has dtype {info['dtype']}; int8 base supports F32/F16/BF16")
            yield name, StoredTensor(handle, start + info["data_offsets"][0], _DTYPES[info["dtype"]], info["shape"])


def stream_tensors(file: Path):
    """Yield (name, tensor) from a safetensors file, one tensor in memory at a time."""
    for name, stored in stored_tensors(file):
        yield name, stored.read()


def load_int8_model(path: Path):
    """An HF causal LM from ``path`` with every Linear and the embedding as int8 (norms stay fp32)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for file in _safetensors_files(path):
        for name, stored in stored_tensors(file):  # 2-D weights are quantized from the file, row slice by slice
            owner, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                raise UserError(f"model.base-quant int8: {path}: tensor {name} has no module in the model") from None
            if isinstance(module, nn.Linear) and attr == "weight":
                bias = module.bias if module.bias is not None and module.bias.device.type != "meta" else None
                _replace(model, owner, Int8Linear.from_weight(stored, bias))
            elif isinstance(module, nn.Embedding) and attr == "weight":
                _replace(model, owner, Int8Embedding(*quantize_rows(stored), module.padding_idx))
            elif isinstance(module, Int8Linear) and attr == "bias":
                module.bias = stored.read().to(torch.float32)
            else:
                setattr(module, attr, nn.Parameter(stored.read().to(torch.float32), requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        embed = model.get_input_embeddings()
        _replace(model, _name_of(model, model.get_output_embeddings()), Int8Linear(embed.qweight, embed.scale))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise UserError(f"model.base-quant int8: {path}: no weights for {', '.join(left[:3])}")
    model.eval()
    return model


def _name_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _replace(model, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
