"""The phone profile (model.dtype=int8): int8 base layers, LoRA on top, DP-SGD through them."""

import pytest
import torch

from slm.int8_base import Int8Embedding, Int8Linear, quantize_rows, stream_tensors
from slm.lora import LoraSpec, adapter_state, attach


def test_int8_linear_matches_fp32_and_passes_input_gradients():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    quant = Int8Linear.from_weight(linear.weight, linear.bias)
    assert quant.qweight.dtype == torch.int8 and not list(quant.parameters())
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = quant(x)
    reference = linear(x)
    # per-row int8: each weight is off by at most half a step (scale / 2)
    assert float((y - reference).detach().abs().max()) < 0.05 * float(reference.detach().abs().max())
    y.sum().backward()
    expected = (torch.ones(3, 5, 48) @ quant.dequantized())
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_row_slices_cover_a_wide_layer(monkeypatch):
    import slm.int8_base as int8

    monkeypatch.setattr(int8, "_SLICE_ELEMENTS", 64 * 7)  # 7 rows per slice: uneven last slice
    quant = Int8Linear.from_weight(torch.randn(50, 64))
    x = torch.randn(2, 64, requires_grad=True)
    y = quant(x)
    torch.testing.assert_close(y, x @ quant.dequantized().T, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ quant.dequantized(), rtol=1e-4, atol=1e-4)


def test_quantize_rows_error_is_at_most_half_a_step():
    weight = torch.randn(16, 32) * torch.logspace(-3, 1, 16).unsqueeze(1)
    q, scale = quantize_rows(weight)
    assert ((q.float() * scale - weight).abs() <= scale / 2 + 1e-7).all()
    table = Int8Embedding(q, scale)
    ids = torch.tensor([[0, 15, 3]])
    torch.testing.assert_close(table(ids), (q.float() * scale)[ids])


def test_stream_tensors_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    back = dict(stream_tensors(tmp_path / "m.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_weight_is_quantized_from_the_file_slice_by_slice(tmp_path, monkeypatch):
    """The load path never holds a whole full-precision matrix: rows come from the file as quantize_rows asks."""
    from safetensors.torch import save_file

    import slm.int8_base as int8

    monkeypatch.setattr(int8, "_SLICE_ELEMENTS", 32 * 3)  # 3 rows per slice: uneven last slice
    tensors = {"w": torch.randn(10, 32), "h": torch.randn(7, 32).to(torch.float16), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    for name, stored in int8.stored_tensors(tmp_path / "m.safetensors"):
        if name == "s":
            assert torch.equal(stored.read(), tensors["s"])
            continue
        assert torch.equal(stored[2:5], tensors[name][2:5])
        from_file, in_memory = quantize_rows(stored), quantize_rows(tensors[name])
        assert all(torch.equal(a, b) for a, b in zip(from_file, in_memory))


@pytest.fixture(scope="module")
def int8_tiny():
    from fedslm.common.config import resolve

    config = resolve({"model.name": "tiny", "model.max-length": 48, "lora.dropout": 0.0, "model.dtype": "int8"})
    model, tokenizer = attach("tiny", LoraSpec.from_config(config), "int8")
    return model, tokenizer, config


def test_int8_tiny_is_int8_with_lora_on_the_targets_and_close_to_fp32(int8_tiny, tiny):
    model, _, config = int8_tiny
    fp32, _ = tiny
    assert not any(isinstance(m, torch.nn.Linear) and not (".lora_" in n) for n, m in model.named_modules())
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, Int8Linear) and n.endswith("base_layer")]
    assert wrapped and all(n.split(".")[-2] in ("q_proj", "v_proj") for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # same seed, same initial adapter; the int8 base changes the logits only slightly
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(model).values(), adapter_state(fp32).values()))
    ids = torch.tensor([[7, 30, 99, 140, 250, 3]])
    with torch.no_grad():
        lo, hi = model(input_ids=ids).logits, fp32(input_ids=ids).logits
    assert float((lo - hi).abs().max()) < 0.05 * float(hi.abs().max())
    assert float((lo.argmax(-1) == hi.argmax(-1)).float().mean()) >= 0.8


def test_dp_sgd_trains_the_adapter_on_the_int8_base(int8_tiny, qa_records):
    from client.train import train_adapter
    from slm.evaluate import evaluate
    from slm.tasks import Task

    model, tokenizer, config = int8_tiny
    task = Task.from_config(config)
    before = adapter_state(model)
    loss_before = evaluate(model, tokenizer, task, qa_records)["eval_loss"]
    result = train_adapter(model, tokenizer, task, qa_records, steps=8, batch_size=8, lr=0.02,
                           noise_multiplier=0.3, clip_norm=1.0, seed=0)
    after = adapter_state(model)
    assert result.steps == 8 and result.examples_seen > 0
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".lora_B." in k for k in changed)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus hooks removed
    assert evaluate(model, tokenizer, task, qa_records)["eval_loss"] < loss_before
