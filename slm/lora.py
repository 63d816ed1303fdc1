"""LoRA adapters: the unit of exchange of the federation.

Only adapter tensors travel (never base weights): with r=8 on q_proj/v_proj that is
460,800 numbers, 1.8 MB in fp32, against 540 MB for SmolLM2-135M. They travel as a Flower
``ArrayRecord`` keyed by PEFT's own state-dict names, so the server can save any round
in PEFT's format and ``PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import write_json_atomic
from fedslm.common.vocabulary import Lora, concept
from slm.base import hub_id, load_base


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    seed: int = 0
    layers: int = 0  # adapters in the top N decoder layers only; 0 = every layer

    @classmethod
    def of(cls, keys: Lora) -> "LoraSpec":
        """The run config's LoRA keys, with the module list split (at a site: the coordinator's request)."""
        targets = tuple(t.strip() for t in keys.target_modules.split(",") if t.strip())
        if keys.r < 1:
            raise UserError("config key 'lora.r': must be at least 1")
        if not targets:
            raise UserError("config key 'lora.target-modules': no module names given")
        if not 0.0 <= keys.dropout < 1.0:
            raise UserError("config key 'lora.dropout': must be in [0, 1)")
        return cls(r=keys.r, alpha=keys.alpha, dropout=keys.dropout, target_modules=targets, seed=keys.seed,
                   layers=keys.layers)

    @classmethod
    def from_config(cls, config: dict) -> "LoraSpec":
        """From a flat config, for the rooms that do not pass typed specs yet."""
        return cls.of(concept(Lora, config))

    def peft_config(self, num_layers: int):
        """PEFT's config; with ``layers`` the adapters sit in the top ``layers`` of ``num_layers`` only."""
        top = list(range(num_layers - self.layers, num_layers)) if self.layers else None
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=top,
            layers_pattern="layers" if top else None,
            bias="none",
            task_type="CAUSAL_LM",
        )


_attached: dict[tuple, object] = {}


def attach(model_ref: str, spec: LoraSpec, dtype: str = "float32", device: torch.device | str = "cpu"):
    """The base model with this adapter attached, on ``device``, built once per process.

    PEFT injects adapter layers into the base in place, so one base serves one spec; the
    adapter values are then swapped per round with ``set_adapter_state``. The initial A
    factors come from ``spec.seed`` so every party derives the same starting adapter.
    The base goes to its device BEFORE PEFT wraps it, so the LoRA factors are created there
    and are the very tensors the optimizer updates: moving a PEFT model afterwards is the
    order behind Opacus issue #820 (LoRA updates silently lost); client.train checks the
    first update (check_first_update).
    """
    device = torch.device(device)
    key = (model_ref, dtype, spec, str(device))
    if key not in _attached:
        base = load_base.__wrapped__(model_ref, dtype)  # a private copy: PEFT mutates it
        base.model.to(device)
        names = {name.rsplit(".", 1)[-1] for name, _ in base.model.named_modules()}
        unknown = [t for t in spec.target_modules if t not in names]
        if unknown:
            raise UserError(f"config key 'lora.target-modules': {', '.join(unknown)} not found in model '{model_ref}'")
        num_layers = base.model.config.num_hidden_layers
        if spec.layers > num_layers:
            raise UserError(f"config key 'lora.layers': {spec.layers} is more than the {num_layers} decoder layers "
                            f"of model '{model_ref}'")
        torch.manual_seed(spec.seed)
        peft_config = spec.peft_config(num_layers)
        if dtype == "int8":
            from slm.int8_base import peft_custom_modules

            peft_config._register_custom_module(peft_custom_modules())
        with warnings.catch_warnings():  # PEFT warns about any layer type it does not know, however wrapped
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            model = get_peft_model(base.model, peft_config)
        # LoRA factors train in fp32 even on a bf16 base: DP noise is small relative to them.
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()
        model.initial_adapter = adapter_state(model)  # as attached from spec.seed, before any round changes it
        _attached[key] = (model, base.tokenizer)
    return _attached[key]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Only the trainable adapter tensors, under PEFT's saved names (no adapter name)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}  # any device


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    expected = get_peft_model_state_dict(model)
    if set(state) != set(expected):
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        raise ValueError(f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"adapter tensor {name}: shape {tuple(value.shape)} != {tuple(expected[name].shape)}")
    set_peft_model_state_dict(model, state)


WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_arrays(state: dict[str, torch.Tensor], wire_dtype: str = "float32"):
    """The tensors as a Flower ArrayRecord, floating ones cast to the wire dtype.

    float16 halves the traffic; every party computes in fp32 (``from_arrays`` casts back).
    bfloat16 is not offered: ArrayRecord goes through numpy, which has no bfloat16.
    """
    from flwr.app import ArrayRecord

    dtype = WIRE_DTYPES[wire_dtype]
    return ArrayRecord(torch_state_dict={
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state.items()})


def from_arrays(record) -> dict[str, torch.Tensor]:
    """Back to tensors; half-precision wire values are widened to fp32 for computing."""
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in record.to_torch_state_dict().items()}


def through_wire(state: dict[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """What the receiver gets: the values rounded to the wire dtype, back in their own dtype."""
    return {k: v.to(WIRE_DTYPES[wire_dtype]).to(v.dtype) if v.is_floating_point() else v for k, v in state.items()}


BASE_FILE = "base_model.json"  # next to adapter_config.json: the base's hub id and where it was on this machine


def save_adapter(state: dict[str, torch.Tensor], spec: LoraSpec, base_model_path: str, out: Path) -> None:
    """Write PEFT's on-disk format (adapter_config.json + adapter_model.safetensors), portable.

    ``base_model_name_or_path`` is the base's hub id (slm.base.hub_id), so
    ``AutoPeftModelForCausalLM.from_pretrained(out)`` finds the base on any machine that has
    that model; the local directory it was trained on goes in ``base_model.json``, a file of
    its own (PEFT would take a local path there as the base, which exists nowhere else).
    Without a known hub id (the tiny test model) the local path stays in both.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(1 + max(_layer_indices(state), default=0))
    hub = hub_id(base_model_path)
    config.base_model_name_or_path = hub or str(base_model_path)
    write_json_atomic(out / BASE_FILE, {"hub_id": hub, "local_path": str(base_model_path)})
    config.inference_mode = True
    tmp = out / "adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out / "adapter_model.safetensors")
    tmp_cfg = out / "adapter_config.json.tmp"
    tmp_cfg.write_text(json.dumps(config.to_dict(), indent=2, default=list))
    tmp_cfg.replace(out / "adapter_config.json")


def _layer_indices(state: dict) -> set[int]:
    return {int(m.group(1)) for m in map(re.compile(r"\.layers\.(\d+)\.").search, state) if m}


def sent_tensors(state: dict[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """What travels: with FFA-LoRA only the B factors (A is fixed and shared), else all."""
    if aggregation == "ffa":
        return {k: v for k, v in state.items() if ".lora_B." in k}
    return dict(state)


def a_factor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the A factors: FFA clients check they froze the same A as the server."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state if ".lora_A." in k):
        digest.update(name.encode())
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def frozen_a_factors(model, freeze: bool):
    """Train only B (FFA-LoRA) for the duration; the cached model is restored afterwards."""
    params = [p for n, p in model.named_parameters() if ".lora_A." in n] if freeze else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
