"""The adapter as a llama.cpp LoRA GGUF: layout llama.cpp checks, q/k permutation, round trip, base + adapter."""

import importlib.util

import numpy as np
import pytest
import torch

from slm.export import gguf_name, permute_for_llama_cpp
from slm.export_lora import applied, read_lora_gguf, write_lora_gguf
from slm.lora import adapter_state, set_adapter_state


def _trained(model, seed=0):
    """The tiny model's adapter with non-zero B factors (a fresh B is zero: nothing to check)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v if ".lora_A." in k else torch.randn(v.shape, generator=generator) * 0.05
             for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    return state


def _llama_cpp_checks(path, base_shapes):
    """What llama-adapter.cpp (llama_adapter_lora_init_impl) checks, on the file's ggml shapes (ne)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    ne = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    for name in ne:
        base = name.rsplit(".", 1)[0]
        assert name.endswith((".lora_a", ".lora_b")) and base in base_shapes, name
        a, b = ne[base + ".lora_a"], ne[base + ".lora_b"]
        assert base_shapes[base][0] == a[0] and base_shapes[base][1] == b[1], name  # "incorrect shape"
        assert a[1] == b[0], name  # "lora_a tensor is not transposed"
    return fields, reader


def test_adapter_file_has_llama_cpps_layout_and_round_trips(tiny, config, tmp_path):
    model, _ = tiny
    state = _trained(model)
    base = model.get_base_model()
    path = tmp_path / "adapter.gguf"
    write_lora_gguf(state, alpha=config["lora.alpha"], config=base.config, out=path, name="t")
    shapes = {gguf_name(hf.replace(".base_layer", "")): list(reversed(tensor.shape))  # ggml ne: reversed numpy
              for hf, tensor in base.state_dict().items() if hf.endswith(("q_proj.base_layer.weight",
                                                                          "v_proj.base_layer.weight"))}
    fields, reader = _llama_cpp_checks(path, shapes)
    assert fields["adapter.lora.alpha"] == config["lora.alpha"]
    lora = read_lora_gguf(path, base.config)
    assert lora.scale == config["lora.alpha"] / config["lora.r"]
    for module, (a, b) in lora.pairs.items():
        want_a = state[f"base_model.model.{module}.lora_A.weight"]
        want_b = state[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(a, want_a, atol=2e-3) and torch.allclose(b, want_b, atol=1e-4)  # F16

    # In llama.cpp's space the pair must add to the permuted weight exactly what PEFT adds to the HF weight.
    heads = base.config.num_attention_heads
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    a_g, b_g = tensors["blk.1.attn_q.weight.lora_a"], tensors["blk.1.attn_q.weight.lora_b"]
    a, b = (state[f"base_model.model.model.layers.1.self_attn.q_proj.lora_{x}.weight"].numpy() for x in "AB")
    np.testing.assert_allclose(b_g @ a_g, permute_for_llama_cpp(b @ a, heads), atol=1e-4)
    assert np.abs(b_g @ a_g - b @ a).max() > 1e-3  # the permutation is not the identity here


def test_base_plus_the_shipped_adapter_computes_what_peft_computes(tiny, config, tmp_path):
    model, _ = tiny
    state = _trained(model, seed=1)
    base = model.get_base_model()
    path = tmp_path / "adapter.gguf"
    write_lora_gguf(state, alpha=config["lora.alpha"], config=base.config, out=path, name="t")
    ids = torch.tensor([[1, 17, 42, 99, 7, 120, 3]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with model.disable_adapter():
            untouched = model(input_ids=ids).logits
            with applied(base, read_lora_gguf(path, base.config)):
                ours = base(input_ids=ids).logits
            after = base(input_ids=ids).logits
    effect, error = float((reference - untouched).abs().max()), float((ours - reference).abs().max())
    assert effect > 1e-2 and error < 0.01 * effect, (effect, error)  # F16 factors: rounding only
    assert torch.equal(after, untouched)  # the base is left as it was


@pytest.mark.integration
def test_smollm2_adapter_is_under_a_megabyte_and_fits_the_real_base_gguf(model_cache, tmp_path):
    from gguf import GGUFReader

    from fedslm.common.config import resolve
    from slm.base import smollm2_gguf_path
    from slm.lora import LoraSpec, attach

    config = resolve({"lora.dropout": 0.0})
    model, _ = attach("smollm2", LoraSpec.from_config(config))
    path = tmp_path / "adapter.gguf"
    write_lora_gguf(adapter_state(model), alpha=config["lora.alpha"], config=model.get_base_model().config,
                    out=path, name="t")
    assert path.stat().st_size <= 1_000_000, path.stat().st_size
    shapes = {t.name: [int(n) for n in t.shape] for t in GGUFReader(str(smollm2_gguf_path())).tensors}
    _, reader = _llama_cpp_checks(path, shapes)
    assert len(reader.tensors) == 2 * 2 * 30


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed (extra)")
def test_llama_cpp_applies_the_adapter_as_transformers_does(model_cache, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from benchmarks.llamacpp import compare_logits
    from fedslm.common.config import resolve
    from slm.base import smollm2_gguf_path
    from slm.lora import LoraSpec, attach

    config = resolve({"lora.dropout": 0.0})
    model, _ = attach("smollm2", LoraSpec.from_config(config))
    generator = torch.Generator().manual_seed(0)
    state = {k: v if ".lora_A." in k else torch.randn(v.shape, generator=generator) * 0.05
             for k, v in adapter_state(model).items()}
    adapter = tmp_path / "adapter.gguf"
    write_lora_gguf(state, alpha=config["lora.alpha"], config=model.get_base_model().config, out=adapter, name="t")
    base_file = smollm2_gguf_path()
    base = AutoModelForCausalLM.from_pretrained(base_file.parent, gguf_file=base_file.name,
                                                dtype=torch.float32, local_files_only=True).eval()
    ids = [1, 504, 3073, 314, 7564, 28, 260, 2233, 30, 1116]

    def llama(**lora):
        llm = Llama(model_path=str(base_file), n_ctx=64, n_threads=2, logits_all=True, verbose=False, **lora)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    with torch.no_grad(), applied(base, read_lora_gguf(adapter, base.config)):
        ours = base(input_ids=torch.tensor([ids])).logits[0].numpy()
    theirs, plain = llama(lora_path=str(adapter)), llama()
    with_adapter = compare_logits(theirs, ours)
    assert compare_logits(theirs, plain)["mean_total_variation"] > 2 * with_adapter["mean_total_variation"]
    assert with_adapter["top1_agreement"] >= 0.8 and with_adapter["mean_total_variation"] < 0.2, with_adapter
