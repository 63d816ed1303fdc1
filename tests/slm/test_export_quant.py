"""Importance-weighted block quantization: gguf's byte layout, and lower weighted error than the reference."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from gguf.quants import quantize as reference

from slm import blockquant
from slm.export import quantize_tensor
from slm.imatrix import calibration_texts, element_weights, importance_matrix


def _weights(rows=96, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    # heavy-tailed rows of different scales, one all-zero block: what real weights look like
    data = rng.standard_t(4, (rows, cols)) * rng.uniform(0.01, 0.2, (rows, 1))
    data[3, :32] = 0.0
    return data.astype(np.float32)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0])
def test_bytes_are_gguf_blocks_and_beat_the_reference_quantizer(qtype):
    data = _weights()
    ours = blockquant.quantize(data, qtype)
    ref = reference(data, qtype)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    back = dequantize(ours, qtype)
    assert back.shape == data.shape and np.all(back[3, :32] == 0)
    assert ((back - data) ** 2).sum() < ((dequantize(ref, qtype) - data) ** 2).sum()
    # every value is d * an integer within the format's levels, d the block's leading fp16
    lo, hi = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-127, 127)}[qtype]
    blocks = ours.reshape(-1, ours.shape[1] // (data.shape[1] // 32))
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    levels = np.divide(back.reshape(-1, 32), d, out=np.zeros((len(d), 32), np.float32), where=d != 0)
    assert np.allclose(levels, np.round(levels), atol=1e-3) and levels.min() >= lo and levels.max() <= hi


def test_importance_weights_move_the_error_to_unimportant_columns():
    data = _weights(seed=1)
    importance = np.ones(data.shape[1], dtype=np.float32)
    importance[::2] = 100.0  # even columns: 100x more input energy
    plain = dequantize(blockquant.quantize(data, T.Q4_0), T.Q4_0)
    weighted = dequantize(blockquant.quantize(data, T.Q4_0, element_weights(data, importance)), T.Q4_0)

    def output_error(back):
        return float((((back - data) ** 2) * importance[None, :]).sum())

    assert output_error(weighted) < output_error(plain)
    assert ((weighted - data)[:, ::2] ** 2).sum() < ((plain - data)[:, ::2] ** 2).sum()


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        blockquant.quantize(np.zeros((2, 40), dtype=np.float32), T.Q4_0)


def test_quantize_tensor_uses_the_output_layers_importance_for_the_tied_embedding():
    data = _weights(rows=64, cols=64)
    importance = {"lm_head.weight": np.linspace(0.01, 10, 64).astype(np.float32)}
    tied = quantize_tensor("model.embed_tokens.weight", data, T.Q5_0, importance)
    expected = blockquant.quantize(data, T.Q5_0, element_weights(data, importance["lm_head.weight"]))
    assert np.array_equal(tied, expected)
    # no importance for the tensor, or Q8_0: gguf-py's reference bytes
    assert np.array_equal(quantize_tensor("model.layers.0.mlp.up_proj.weight", data, T.Q4_0, importance),
                          reference(data, T.Q4_0))
    assert np.array_equal(quantize_tensor("model.embed_tokens.weight", data, T.Q8_0, importance),
                          reference(data, T.Q8_0))


def test_importance_matrix_covers_every_linear_input(tiny):
    model, tokenizer = tiny
    model.train()
    texts = calibration_texts(tokenizer)
    assert len(texts) == 32 and all(isinstance(t, str) and t for t in texts)
    importance = importance_matrix(model, tokenizer, texts[:4], max_length=32)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(importance) == {f"{n}.weight" for n in linears}
    (lm_head,) = [v for k, v in importance.items() if k.endswith("lm_head.weight")]  # PEFT prefixes names
    assert lm_head.shape == (model.config.hidden_size,) and (lm_head > 0).all()
    assert model.training  # the caller's mode is restored
    model.eval()
