"""Merging and the GGUF layout; the real GGUF round trip is in tests/integration/test_ship.py."""

import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from fedslm.common.errors import UserError
from slm.export import gguf_name, merge_adapter, permute_for_llama_cpp
from slm.lora import LoraSpec, adapter_state, save_adapter, set_adapter_state


@pytest.mark.parametrize("heads, kv_heads", [(9, 9), (9, 3), (4, 2)])
def test_permutation_is_undone_by_transformers_gguf_loader(heads, kv_heads):
    weight = np.random.default_rng(0).standard_normal((kv_heads * 64, 576)).astype(np.float32)
    loader = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    back = loader._reverse_permute_weights(permute_for_llama_cpp(weight, kv_heads), heads, kv_heads)
    np.testing.assert_array_equal(back, weight)


def test_llama_cpp_tensor_names():
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    assert gguf_name("lm_head.weight") is None  # tied to the embedding
    with pytest.raises(UserError, match="no llama.cpp name"):
        gguf_name("model.layers.0.self_attn.rotary.inv_freq")


def test_merged_model_gives_the_adapter_models_logits(tiny, tmp_path, config):
    """fp32, tight tolerance: merging is exact up to float rounding."""
    from slm.base import resolve_model_dir

    model, _ = tiny
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    save_adapter(state, LoraSpec.from_config(config), str(resolve_model_dir("tiny")), tmp_path / "adapter")
    merged, _ = merge_adapter("tiny", tmp_path / "adapter", tmp_path / "merged")
    ids = torch.tensor([[7, 30, 99, 140, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)
