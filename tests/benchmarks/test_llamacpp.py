"""llama.cpp vs transformers: the comparison itself (always), and both runtimes on a real GGUF (with the extra)."""

import importlib.util

import numpy as np
import pytest

from benchmarks.llamacpp import compare_logits


def test_identical_logits_agree_everywhere():
    logits = np.random.default_rng(0).normal(size=(5, 50))
    result = compare_logits(logits, logits.copy())
    assert result["max_abs_diff"] == 0 and result["top1_agreement"] == 1
    assert result["max_total_variation"] < 1e-12 and result["first_top1_disagreement"] is None


def test_a_flipped_top_token_is_found_at_its_position():
    logits = np.zeros((4, 10))
    logits[:, 3] = 5.0
    other = logits.copy()
    other[2, 7] = 6.0  # position 2 now prefers token 7
    result = compare_logits(logits, other)
    assert result["first_top1_disagreement"] == 2 and result["top1_agreement"] == 0.75
    assert result["max_abs_diff"] == 6.0 and result["max_total_variation"] > 0.5


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed (extra)")
def test_llama_cpp_reads_the_base_gguf_as_transformers_does():
    from benchmarks.llamacpp import compare_file
    from slm.base import smollm2_gguf_path

    result = compare_file(smollm2_gguf_path(), prompts=("What is the capital of France?",), new_tokens=8)
    row = result["prompts"][0]
    # Same file, same tokens: the runtimes round differently (llama.cpp quantizes activations), but they must
    # compute the same model: a layout error (names, q/k permutation) would make the top tokens unrelated.
    assert row["prompt_logits"]["top1_agreement"] >= 0.8, row
    assert row["prompt_logits"]["mean_total_variation"] < 0.2, row
