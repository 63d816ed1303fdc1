"""Device selection, the placement-order guard (CPU) and the CUDA path (skipped without a GPU)."""

import pytest
import torch

from client.site import SitePolicy
from client.train import train_adapter
from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from slm.base import resolve_device
from slm.lora import adapter_state, frozen_a_factors
from slm.tasks import Task

NODE = {"name": "A", "data-path": "/data/a.jsonl", "ledger-dir": "/var/ledger", "max-epsilon": 8.0, "model-dir": "tiny"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means cuda here")
def test_auto_is_cpu_without_cuda_and_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="model.device.*'cuda:0', but this machine has 0 CUDA"):
        resolve_device("cuda:0")


def test_bad_device_names_the_key():
    with pytest.raises(UserError, match="config key 'model.device': 'gpu' is not auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="node config: 'device' 'tpu'"):
        SitePolicy.from_node_config({**NODE, "device": "tpu"})


def test_the_sites_device_wins_over_the_run_config():
    assert SitePolicy.from_node_config({**NODE, "device": "cpu"}).device_name(asking("cuda")) == "cpu"
    assert SitePolicy.from_node_config(NODE).device_name(asking("cuda:1")) == "cuda:1"


class _LosesUpdates(torch.optim.SGD):
    """SGD whose updates never reach the model's tensors (as when they were replaced after it was built)."""

    def step(self, closure=None):
        return None


def test_an_update_that_misses_the_models_adapter_is_caught_after_the_first_step(tiny, qa_records):
    """Opacus issue #820's symptom: the step runs, the model's LoRA weights never change. One line, no silence."""
    model, tok = tiny
    with pytest.raises(RuntimeError, match="lora_.* did not change.*moved to its device after PEFT"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=2, lr=0.1,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0, make_optimizer=lambda ps: _LosesUpdates(ps, lr=0.1))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters()), "Opacus hooks left behind"


class _TouchesFrozen(torch.optim.SGD):
    """SGD that also writes to a tensor it was not given (stands in for any path that moves a frozen factor)."""

    frozen = None

    def step(self, closure=None):
        with torch.no_grad():
            self.frozen.add_(1.0)
        return super().step(closure)


def test_a_frozen_a_factor_that_moves_is_caught(tiny, qa_records):
    model, tok = tiny
    a = next(p for n, p in model.named_parameters() if ".lora_A." in n)

    def make(params):
        optimizer = _TouchesFrozen(params, lr=0.1)
        optimizer.frozen = a
        return optimizer

    with frozen_a_factors(model, True), pytest.raises(RuntimeError, match="frozen .*lora_A.* changed"):
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=1, batch_size=2, lr=0.1,
                      noise_multiplier=1.0, clip_norm=1.0, seed=0, make_optimizer=make)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_releases_the_cpu_step_update(config, qa_records):
    """Same entropy: the CUDA path samples and noises exactly as the CPU path (noise drawn on the CPU, moved)."""
    from slm.lora import LoraSpec, attach, set_adapter_state

    updates = []
    for device in ("cpu", "cuda"):
        model, tok = attach("tiny", LoraSpec.from_config(config), "float32", device)
        assert all(p.device.type == device for p in model.parameters())
        initial = adapter_state(model)
        train_adapter(model, tok, Task(kind="sft", max_length=48), qa_records, steps=2, batch_size=6, lr=0.1,
                      noise_multiplier=1.0, clip_norm=1.0, seed=5, physical_batch_size=4,
                      make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        updates.append({k: adapter_state(model)[k] - initial[k] for k in initial})
        set_adapter_state(model, initial)
    for key in updates[0]:
        torch.testing.assert_close(updates[1][key], updates[0][key], rtol=1e-3, atol=1e-5)


def asking(device: str) -> RunConfig:
    return RunConfig.parse(resolve({"model.device": device}))
