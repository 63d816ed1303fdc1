"""The server's checkpoint, for ``fedslm simulate --resume``.

One safetensors file: the global adapter as tensors, everything else (round, privacy
view, the seeded client-selection state, user-level DP events) as JSON in the header
metadata. Written to a temporary file, fsynced and renamed, so a kill leaves the
previous checkpoint or the new one, never half of either. It is written after every
completed round and, under user-level DP, also right after a round's noise is drawn and
its event counted, before anything of that round is released (server.rounds).

What it never holds: the user-level DP noise generator and any user-level cohort
sampling state. Both are drawn fresh in every process (server.user_dp); restoring them
would make a resumed run repeat a redone round's cohort and noise, and two releases
with the same noise differ by the noise-free update. ``sampling`` is the seeded
``server.seed`` selection used only WITHOUT user-level DP, where no privacy is claimed
from client selection. Checkpoints written before this change still load: their noise
generator state is dropped, never restored.

The run directory (metrics.jsonl, privacy/ledger.json, checkpoint.safetensors) is
secret material: anyone who reads it learns who took part, against whom the user-level
amplification does not hold. This file holds the privacy view (every site's reported
records, per round), so keep it, and copies of it, where the run's participants may not
be learned.
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

from fedslm.common.errors import UserError

NAME = "checkpoint.safetensors"
_LEGACY_NOISE_STATE = "__noise_generator_state__"  # older checkpoints saved the noise generator; never restored


@dataclass
class ServerState:
    """What the round loop needs to continue where it stopped (randomness that must stay secret excluded)."""

    round: int
    adapter: dict[str, torch.Tensor]
    sampling: random.Random  # seeded client selection without user-level DP (no privacy claimed from it)
    privacy_view: dict = field(default_factory=dict)
    user_dp_events: list[dict] = field(default_factory=list)  # every user-level release counted so far


def save(run_dir: Path, state: ServerState) -> None:
    tensors = {k: v.contiguous() for k, v in state.adapter.items()}
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
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != _LEGACY_NOISE_STATE}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint {path}: unreadable ({err})") from None
    return ServerState(round=meta["round"], adapter=tensors, sampling=_rng_from_json(meta["sampling"]),
                       privacy_view=meta["privacy_view"], user_dp_events=meta["user_dp_events"])


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng
