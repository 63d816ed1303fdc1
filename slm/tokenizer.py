"""A model reference's tokenizer, without its weights: for looking at data before any training.

``fedslm data`` and the preflight count tokens and show prompts; loading 540 MB of weights
for that would be waste. The default SmolLM2 reads its converted cache directory when it
exists, else its GGUF's tokenizer metadata directly (transformers builds the tokenizer from
it without dequantizing a weight); ``tiny`` is built in code; any other reference is an HF
directory, which must carry its tokenizer files.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedslm.common.errors import UserError


@lru_cache(maxsize=2)
def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    from slm.base import DEFAULT_MODEL, cache_dir, resolve_model_dir, smollm2_gguf_path

    if ref == "tiny":
        from slm.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    elif ref == DEFAULT_MODEL and not (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    else:
        path = resolve_model_dir(ref) if ref == DEFAULT_MODEL else Path(ref).expanduser()
        if not path.is_dir():
            raise UserError(f"model '{ref}': not 'smollm2', 'tiny' or an existing directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"model '{ref}': cannot load only its tokenizer from {path} "
                            f"({str(err).splitlines()[0]})") from err
    if tokenizer.pad_token_id is None:  # as slm.base.load_base does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
