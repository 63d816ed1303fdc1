import pytest
import torch

from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from slm.lora import (
    LoraSpec,
    adapter_state,
    attach,
    from_arrays,
    save_adapter,
    set_adapter_state,
    to_arrays,
)


def test_only_adapter_tensors_travel(tiny):
    model, _ = tiny
    state = adapter_state(model)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in state.values()) == trainable


def test_adapter_arrayrecord_round_trip_is_exact(tiny):
    model, _ = tiny
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    record = to_arrays(state)
    back = from_arrays(record)
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
    set_adapter_state(model, back)
    assert all(torch.equal(adapter_state(model)[k], state[k]) for k in state)


def test_set_adapter_rejects_wrong_keys_and_shapes(tiny):
    model, _ = tiny
    state = adapter_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(model, {**state, name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="keys differ"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(tiny, tmp_path, config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slm.base import resolve_model_dir

    model, _ = tiny
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    save_adapter(state, LoraSpec.from_config(config), str(resolve_model_dir("tiny")), tmp_path / "a")
    fresh = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    ids = torch.tensor([[5, 9, 77, 120, 33]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_same_seed_same_initial_adapter():
    """Server and clients derive the initial adapter independently; it must match."""
    from slm.lora import _attached

    spec = LoraSpec.from_config(resolve({"model.name": "tiny", "lora.r": 2, "lora.seed": 5}))
    first = adapter_state(attach("tiny", spec)[0])
    _attached.clear()
    second = adapter_state(attach("tiny", spec)[0])
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_target_module_is_named():
    spec = LoraSpec.from_config(resolve({"model.name": "tiny", "lora.target-modules": "q_proj,qkv"}))
    with pytest.raises(UserError, match="lora.target-modules': qkv not found"):
        attach("tiny", spec)


def test_a_saved_adapter_names_the_hub_id_and_loads_from_another_directory(tiny, tmp_path, config):
    """Issue 27 item 6: adapters recorded the writer's cache path as their base and loaded nowhere else."""
    import json
    import shutil

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from slm.base import SMOLLM2_HUB_ID, cache_dir, hub_id, resolve_model_dir

    base = shutil.copytree(resolve_model_dir("tiny"), tmp_path / "base-on-machine-a")
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**raw, "_name_or_path": "fedslm-tests/tiny-llama"}))
    model, _ = tiny
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    save_adapter(state, LoraSpec.from_config(config), str(base), tmp_path / "written")
    moved = shutil.move(tmp_path / "written", tmp_path / "elsewhere" / "adapter")
    assert PeftConfig.from_pretrained(moved).base_model_name_or_path == "fedslm-tests/tiny-llama"
    assert json.loads((moved / "base_model.json").read_text()) == {"hub_id": "fedslm-tests/tiny-llama",
                                                                    "local_path": str(base)}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), moved).eval()
    ids = torch.tensor([[5, 9, 77, 120, 33]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert hub_id(cache_dir() / "smollm2-135m-instruct") == SMOLLM2_HUB_ID
    assert hub_id(resolve_model_dir("tiny")) is None  # no hub id known: the local path stays
