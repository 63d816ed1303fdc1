"""The adapter the first round starts from: the shared seed's, or the one ``server.initial-adapter`` names.

A directory in PEFT's adapter format: what ``fedslm warm-start`` writes (an adapter the
coordinator trained on a public file, with ``warm_start.json`` saying which), or a run's
``adapters/round-<k>``. It is checked against the run before round 0 — the same tensor
names and shapes as the run's LoRA settings give, finite values, and under FFA-LoRA the
shared seed's A factors (every site freezes its own copy of them and refuses a round whose
A differs) — and what it was is written to the run directory (``initial_adapter.json``),
where the report reads it: a run that started from an adapter trained elsewhere says so.
"""

from __future__ import annotations

from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import read_json
from fedslm.common.vocabulary import RunConfig, Task
from slm.digest import sha256_of

WARM_START_FILE = "warm_start.json"  # written by `fedslm warm-start` next to the adapter
RECORD_FILE = "initial_adapter.json"  # in the run directory
KEY = "config key 'server.initial-adapter'"


def check_directory(directory: str) -> Path:
    """The adapter file of ``directory``, or one line saying what is wrong (before anything trains)."""
    path = Path(directory).expanduser().resolve()
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{KEY}: {path} holds no adapter_model.safetensors (give a `fedslm warm-start` output "
                        "or a run's adapters/round-<k>)")
    if (path / WARM_START_FILE).exists():
        read_json(path / WARM_START_FILE, "warm start")
    return weights


def load_initial(directory: str, seeded: dict, specs: RunConfig) -> tuple[dict, dict]:
    """(the starting adapter, what initial_adapter.json records); ``seeded``: the shared seed's adapter."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from slm.lora import a_factor_digest

    weights = check_directory(directory)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{KEY}: {weights} is not a readable safetensors file ({err})") from None
    missing, extra = sorted(set(seeded) - set(state)), sorted(set(state) - set(seeded))
    if missing or extra:
        name = (missing or extra)[0]
        raise UserError(f"{KEY}: {weights.parent} {'lacks' if missing else 'has an extra'} tensor {name} "
                        f"({len(missing)} missing, {len(extra)} extra): it was trained with other LoRA settings "
                        "(lora.r, lora.target-modules, lora.layers) or another model")
    for name, tensor in seeded.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{KEY}: {name} is {tuple(state[name].shape)} in {weights.parent}, the run's is "
                            f"{tuple(tensor.shape)} (other lora.r or another model)")
        if not torch.isfinite(state[name]).all():
            raise UserError(f"{KEY}: {name} in {weights.parent} holds NaN or infinite values")
    state = {name: state[name].to(seeded[name].dtype) for name in seeded}
    if specs.server.aggregation == "ffa" and a_factor_digest(state) != a_factor_digest(seeded):
        raise UserError(f"{KEY}: its A factors are not the shared seed's (lora.seed {specs.lora.seed}): under "
                        "FFA-LoRA every site freezes the seed's A, so only B may be trained before the run "
                        "(`fedslm warm-start` with the run's settings does that)")
    warm = read_json(weights.parent / WARM_START_FILE, "warm start") if (weights.parent / WARM_START_FILE).exists() \
        else None
    digest = sha256_of(weights)
    if warm is not None:
        if warm.get("adapter_sha256") != digest:
            raise UserError(f"{KEY}: {weights.parent / WARM_START_FILE} describes another adapter (sha256 "
                            f"{str(warm.get('adapter_sha256'))[:16]}, the file's is {digest[:16]})")
        _same_task(warm, specs.task, weights.parent)
    record = {"directory": str(weights.parent), "adapter_sha256": digest, "warm_start": warm}
    return state, record


def _same_task(warm: dict, task: Task, where: Path) -> None:
    """A warm start for another task scores other candidates (or none): refused, naming what differs."""
    if warm.get("task") != task.task:
        raise UserError(f"{KEY}: {where} was warm-started for a {warm.get('task')} task; this run is {task.task}")
    if task.task == "label" and task.verbalizers and warm.get("verbalizers") != task.verbalizers:
        raise UserError(f"{KEY}: {where} was warm-started with verbalizers {warm.get('verbalizers')!r}; this run "
                        f"scores {task.verbalizers!r} (give the same data.verbalizers to both)")
