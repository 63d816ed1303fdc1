"""Importance matrix for 4-bit export: which input columns of each weight matter.

A Linear layer's output error from a weight error E is E x; over inputs x its expected
square is sum_j E_ij^2 E[x_j^2] (cross terms averaging out). So a column j whose input
is large on real text deserves a finer grid than one that is always near zero. The
importance of column j is E[x_j^2], measured with forward hooks on calibration text
(llama.cpp's ``imatrix``). The tied embedding takes the importance of the output layer's
input (the final hidden states), where its errors reach the logits.

Calibration text is public, never client data (the server has none): 32 question /
long-answer pairs of PubMedQA (MIT licence, pubmedqa/pubmedqa), a medical text of a
different source than the federation's, formatted with the model's chat template as the
clients' SFT examples are. Measured on the hospital model: Q4_0 eval loss +6.5% with the
reference quantizer, +7.5% with a plain (unweighted) MSE scale search, +3.9% with this
importance matrix (BENCHMARKS.md, "Quantization retention").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CALIBRATION = Path(__file__).parent / "calibration" / "pubmedqa_32.jsonl"


def calibration_texts(tokenizer, path: Path = CALIBRATION) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                           {"role": "assistant", "content": r["long_answer"]}], tokenize=False)
            for r in rows]


@torch.no_grad()
def importance_matrix(model, tokenizer, texts: list[str], max_length: int = 256) -> dict[str, np.ndarray]:
    """Mean squared input activation per column of every Linear weight: {"<module>.weight": (in,)}."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + len(x)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        for text in texts:
            model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {f"{name}.weight": (sums[name] / counts[name]).to(torch.float32).numpy() for name in sums}


def element_weights(weight: np.ndarray, column_importance: np.ndarray) -> np.ndarray:
    """llama.cpp's per-weight error weights: importance[j] * sqrt(mean row square + w^2).

    The second factor also favours large weights within a block (their relative error
    matters most); measured better than the bare column importance (+3.9% vs +4.2%).
    """
    square = weight * weight
    return column_importance[None, :] * np.sqrt(square.mean(axis=1, keepdims=True) + square)
