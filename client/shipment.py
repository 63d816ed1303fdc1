"""Receive a shipped model: verify, store, load, evaluate locally. Only metrics go back.

The file is checked against the sha256 the server announced before anything is
written over: a corrupted or mismatched file is rejected with a clear error, and the
model already in the client's model directory stays as it was. A verified file is
written to a temporary name, fsynced and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from slm.errors import UserError


def verify_and_store(payload: np.ndarray, *, expected_sha256: str, expected_bytes: int, directory: Path,
                     name: str) -> Path:
    data = payload.tobytes()
    if len(data) != expected_bytes:
        raise UserError(f"shipped model {name}: {len(data)} bytes, announced {expected_bytes}; rejected, nothing replaced")
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


def receive_and_evaluate(payload: np.ndarray, announced: dict, config: dict, local) -> tuple[Path, dict]:
    """Verify and store a shipped file in this client's model directory, then evaluate it on its test split."""
    from transformers import AutoTokenizer

    from slm.base import resolve_model_dir
    from slm.evaluate import evaluate
    from slm.tasks import Task

    directory = Path(config["ship.dir"] or Path(str(announced["run-dir"])) / "shipped") / local.name
    path = verify_and_store(payload, expected_sha256=str(announced["sha256"]), expected_bytes=int(announced["bytes"]),
                            directory=directory, name=str(announced["file"]))
    model = load_shipped(str(path), str(announced["sha256"]))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config["model.name"]), local_files_only=True)
    return path, evaluate(model, tokenizer, Task.from_config(config), local.test)


@lru_cache(maxsize=2)
def load_shipped(path: str, sha256: str):
    """The GGUF as a transformers model (dequantized weights), once per file and process."""
    import torch
    from transformers import AutoModelForCausalLM

    file = Path(path)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval()
