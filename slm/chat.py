"""Talk to a fine-tuned model: a shipped GGUF file or a merged HF directory, tokens streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from fedslm.common.errors import UserError


def load_for_chat(model: str):
    """(model, tokenizer) from a .gguf file (self-contained: its own tokenizer) or an HF directory."""
    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            kwargs = {"gguf_file": path.name, "local_files_only": True}
            return (AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval(),
                    AutoTokenizer.from_pretrained(path.parent, **kwargs))
        if path.is_dir() and (path / "config.json").is_file():
            return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval(),
                    AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise UserError(f"model {model}: cannot be loaded ({str(err).splitlines()[0]})") from None
    raise UserError(f"model {model}: not a .gguf file or an HF model directory")


def reply(model, tokenizer, history: list[dict], max_new_tokens: int = 200) -> str:
    """Generate greedily, printing tokens as they come; returns the full answer."""
    inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(model_path: str, prompt: str | None, max_new_tokens: int) -> None:
    model, tokenizer = load_for_chat(model_path)
    if prompt is not None:
        reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)
        return
    history: list[dict] = []
    print("fedslm chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, max_new_tokens)})
