"""Receive a shipped model: verify, store, load, evaluate locally. Only metrics go back.

The file is checked against the sha256 the server announced before anything is
written over: a corrupted or mismatched file is rejected with a clear error, and the
model already in the client's model directory stays as it was. A verified file is
written to a temporary name, fsynced and renamed into place.

Three roles (server.ship): a merged model and a device base (installed once per run)
are GGUF models, evaluated as they are; an adapter (llama.cpp LoRA GGUF) is evaluated on
the base this device already holds in the same directory, named and pinned by sha256 in
the announcement: the base is loaded as transformers loads a GGUF (dequantized) and the
adapter, read back from the stored file, is applied as llama.cpp applies it
(slm.export_lora).
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from slm.digest import sha256_of


def verify_and_store(payload: np.ndarray, *, expected_sha256: str, expected_bytes: int, directory: Path,
                     name: str) -> Path:
    data = payload.tobytes()
    if len(data) != expected_bytes:
        raise UserError(f"shipped model {name}: {len(data)} bytes, announced {expected_bytes}; rejected, "
                        "nothing replaced")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise UserError(f"shipped model {name}: sha256 {digest[:16]}... does not match the announced "
                        f"{expected_sha256[:16]}...; rejected, nothing replaced")
    if Path(name).name != name or not name.endswith(".gguf"):
        raise UserError(f"shipped model {name!r}: not a plain .gguf file name; rejected")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = directory / (name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


def receive_and_evaluate(payload: np.ndarray, announced: dict, specs: RunConfig, local,
                         evaluate_fn=None) -> tuple[Path, dict]:
    """Verify and store a shipped file in this client's model directory, then evaluate it on its test split.

    ``evaluate_fn(model, tokenizer, task, records)`` -> metrics: a deployed site's own rules
    (client.evaluation); default slm.evaluate.evaluate (in clear, a simulation's).
    """
    from transformers import AutoTokenizer

    from slm.base import resolve_model_dir
    from slm.evaluate import evaluate
    from slm.tasks import Task

    directory = Path(specs.ship.dir or Path(str(announced["run-dir"])) / "shipped") / local.name
    path = verify_and_store(payload, expected_sha256=str(announced["sha256"]), expected_bytes=int(announced["bytes"]),
                            directory=directory, name=str(announced["file"]))
    if str(announced.get("role", "merged")) == "adapter":
        model, context = _on_device_base(path, announced, directory)
    else:
        model, context = load_shipped(path, str(announced["sha256"])), nullcontext()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(specs.model.name), local_files_only=True)
    with context:
        return path, (evaluate_fn or evaluate)(model, tokenizer, Task.of(specs), local.test)


def _on_device_base(adapter: Path, announced: dict, directory: Path):
    """(this device's base, a context applying the stored adapter to it); the base must be the announced one."""
    from slm.export_lora import applied, read_lora_gguf

    name, sha256 = str(announced["base-file"]), str(announced["base-sha256"])
    base = directory / name
    if Path(name).name != name or not base.is_file() or sha256_of(base) != sha256:
        raise UserError(f"shipped adapter {adapter.name}: this device has no base {name!r} with sha256 "
                        f"{sha256[:16]}... (install the base first); nothing evaluated")
    model = load_shipped(base, sha256)
    return model, applied(model, read_lora_gguf(adapter, model.config))


_loaded: dict[str, object] = {}
_loading = threading.Lock()


def load_shipped(path: Path, sha256: str):
    """The GGUF as a transformers model (dequantized weights), once per content and process.

    Keyed by sha256, not path: every simulated device stores its own copy of the same base,
    and one dequantized copy (~0.5 GB, ~10-30 s to load) serves them all. Two kept at most.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with _loading:
        if sha256 not in _loaded:
            file = Path(path)
            model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32,
                                                         local_files_only=True)
            while len(_loaded) >= 2:
                _loaded.pop(next(iter(_loaded)))
            _loaded[sha256] = model.eval()
        return _loaded[sha256]
