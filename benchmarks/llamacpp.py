"""Do llama.cpp and transformers compute the same model from the same GGUF? Where do they part?

Devices run our GGUF files in llama.cpp; the federation evaluates them with transformers
(``gguf_file=``, weights dequantized to fp32). Both read identical bytes, so any
difference comes from how they compute. For the same token ids, this compares every
position's next-token logits (max |difference|, top-1 agreement, total-variation distance
of the two softmaxes), then greedy generation: the first generated token where they
disagree and, at that step, transformers' margin between its top two tokens (a near-tie
flipped by rounding is benign; a confident disagreement is a bug).

llama.cpp multiplies quantized weights by activations that it quantizes too (Q8_0/Q8_1
blocks for Q4/Q5/Q8 weights, F16 for F16 weights), while transformers multiplies the
dequantized weights in fp32: comparing an F16 file with quantized ones separates that
effect from layout errors (tensor names, the q/k permutation), which would break all
formats alike.

Optional: needs ``llama_cpp`` (the ``llamacpp`` extra, built from source; see
BENCHMARKS.md). ``python -m benchmarks llamacpp FILE.gguf ...``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPTS = ("What is the capital of France?", "What are the symptoms of glaucoma?")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def compare_logits(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Position-wise comparison of two [positions, vocab] logit arrays."""
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    top_ours, top_theirs = ours.argmax(-1), theirs.argmax(-1)
    agree = top_ours == top_theirs
    tv = 0.5 * np.abs(_softmax(ours) - _softmax(theirs)).sum(-1)
    disagree = np.flatnonzero(~agree)
    return {"positions": len(agree), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "mean_abs_diff": float(np.abs(ours - theirs).mean()), "top1_agreement": float(agree.mean()),
            "max_total_variation": float(tv.max()), "mean_total_variation": float(tv.mean()),
            "first_top1_disagreement": int(disagree[0]) if len(disagree) else None}


def _transformers_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _greedy_transformers(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the margin between the top two logits."""
    tokens, margins = list(ids), []
    for _ in range(n):
        last = _transformers_logits(model, tokens)[-1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tokens.append(int(last.argmax()))
    return tokens[len(ids):], margins


def _llama(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    tokens = list(ids)
    for _ in range(n):
        tokens.append(int(_llama_logits(llm, tokens)[-1].argmax()))
    return tokens[len(ids):]


def compare_file(path: Path, prompts=PROMPTS, new_tokens: int = 24) -> dict:
    """Both runtimes on one GGUF file, for each prompt (chat template applied by transformers' tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    llm = _llama(path, n_ctx=512)
    rows = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        row = {"prompt": prompt, "tokens": len(ids),
               "prompt_logits": compare_logits(_llama_logits(llm, ids), _transformers_logits(model, ids))}
        ours, margins = _greedy_transformers(model, ids, new_tokens)
        theirs = _greedy_llama(llm, ids, new_tokens)
        split = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
        row.update({"greedy_identical_tokens": new_tokens if split is None else split,
                    "greedy_first_difference": split,
                    "transformers_margin_there": None if split is None else margins[split],
                    "transformers_min_margin": min(margins),
                    "transformers_text": tokenizer.decode(ours, skip_special_tokens=True),
                    "llama_cpp_text": tokenizer.decode(theirs, skip_special_tokens=True)})
        rows.append(row)
    return {"file": str(path), "bytes": path.stat().st_size, "new_tokens": new_tokens, "prompts": rows}


def render(results: list[dict]) -> str:
    header = (f"{'file':<44} {'prompt':<36} {'max|dlogit|':>11} {'top1 agr':>8} {'max TV':>7} "
              f"{'greedy same':>11} {'margin there':>12}")
    lines = [header]
    for result in results:
        for row in result["prompts"]:
            pl = row["prompt_logits"]
            margin = row["transformers_margin_there"]
            lines.append(f"{Path(result['file']).name:<44} {row['prompt'][:36]:<36} {pl['max_abs_diff']:>11.3f} "
                         f"{pl['top1_agreement']:>8.2f} {pl['max_total_variation']:>7.3f} "
                         f"{row['greedy_identical_tokens']:>5} of {result['new_tokens']:<3}"
                         f"{'-' if margin is None else f'{margin:.3f}':>12}")
    return "\n".join(lines)


def run(files: list[Path], new_tokens: int = 24) -> list[dict]:
    results = [compare_file(Path(f), new_tokens=new_tokens) for f in files]
    print(render(results))
    for result in results:
        for row in result["prompts"]:
            if row["greedy_first_difference"] is not None:
                print(f"{Path(result['file']).name} / {row['prompt']!r}:\n  transformers: {row['transformers_text']!r}"
                      f"\n  llama.cpp:    {row['llama_cpp_text']!r}")
    return results
