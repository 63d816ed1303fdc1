"""The server's checkpoint after every completed round, for ``fedslm simulate --resume``.

One safetensors file: the global adapter and the user-DP noise generator state as
tensors, everything else (round, privacy view, sampling RNG state, user-level DP events)
as JSON in the header metadata. Written to a temporary file, fsynced and renamed, so a
kill leaves the previous checkpoint or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slm.errors import UserError

NAME = "checkpoint.safetensors"
_GEN = "__noise_generator_state__"


@dataclass
class ServerState:
    """Everything the round loop needs to continue exactly where it stopped."""

    round: int
    adapter: dict[str, torch.Tensor]
    sampling: random.Random
    noise: torch.Generator
    privacy_view: dict = field(default_factory=dict)
    user_dp_events: list[dict] = field(default_factory=list)


def save(run_dir: Path, state: ServerState) -> None:
    tensors = {k: v.contiguous() for k, v in state.adapter.items()}
    tensors[_GEN] = state.noise.get_state()
    meta = {"round": state.round, "sampling": _rng_to_json(state.sampling), "privacy_view": state.privacy_view,
            "user_dp_events": state.user_dp_events}
    path = Path(run_dir) / NAME
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"fedslm": json.dumps(meta)})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(run_dir: Path) -> ServerState:
    path = Path(run_dir) / NAME
    if not path.is_file():
        raise UserError(f"run directory {run_dir}: no {NAME} (no round completed, nothing to resume)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["fedslm"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint {path}: unreadable ({err})") from None
    noise = torch.Generator()
    noise.set_state(tensors.pop(_GEN))
    return ServerState(round=meta["round"], adapter=tensors, sampling=_rng_from_json(meta["sampling"]), noise=noise,
                       privacy_view=meta["privacy_view"], user_dp_events=meta["user_dp_events"])


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng
