"""`fedslm warm-start` and server.initial-adapter: a starting adapter trained on a public file, checked against the
run before round 0 (same tensors, FFA's shared A, the adapter warm_start.json describes, the same task)."""

import json

import pytest
import torch

from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from server.initial_adapter import load_initial
from simulation.warm_start import warm_start
from slm.lora import LoraSpec, a_factor_digest, adapter_state, attach

SETTINGS = ["model.name=tiny", "data.task=sft", "data.partition=iid", "lora.dropout=0.0"]


def public_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_config(**keys):
    return resolve({"model.name": "tiny", "data.task": "sft", "lora.dropout": 0.0, **keys})


def seeded_adapter(config):
    model, _ = attach("tiny", LoraSpec.from_config(config))
    return {k: v.clone() for k, v in model.initial_adapter.items()}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    records = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a rare disorder of the heart."}
               for i in range(40)]
    out = root / "start"
    record = warm_start(str(public_file(root / "public.jsonl", records)), str(out), SETTINGS, scenario="tiny",
                        steps=12, lr=1e-2, say=lambda line: None)
    return out, record


def test_a_warm_start_trains_b_only_under_ffa_and_records_its_public_file(warm):
    out, record = warm
    config = run_config()
    seeded = seeded_adapter(config)
    state, start = load_initial(str(out), seeded, RunConfig.parse(config))
    assert a_factor_digest(state) == a_factor_digest(seeded)  # the sites' frozen A
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # B starts at 0 and was trained
    assert record["trained"] == "B factors only (FFA-LoRA)" and record["steps"] == 12 and record["task"] == "sft"
    assert record["held_out_after"]["eval_loss"] < record["held_out_before"]["eval_loss"]
    assert len(record["file_sha256"]) == 64 and record["file"] == "public.jsonl"
    assert start["warm_start"] == json.loads((out / "warm_start.json").read_text())
    assert start["adapter_sha256"] == record["adapter_sha256"]
    model, _ = attach("tiny", LoraSpec.from_config(config))
    assert all(torch.equal(v, seeded[k]) for k, v in adapter_state(model).items())  # the cached model is restored


def test_the_server_refuses_a_starting_adapter_that_does_not_fit_the_run(warm, tmp_path):
    out, _ = warm
    config = run_config()
    seeded = seeded_adapter(config)
    with pytest.raises(UserError, match="holds no adapter_model.safetensors"):
        load_initial(str(tmp_path), seeded, RunConfig.parse(config))
    other = run_config(**{"lora.r": 4})
    with pytest.raises(UserError, match=r"lora_A.*is \(8, .*the run's is \(4, .*other lora.r"):
        load_initial(str(out), seeded_adapter(other), RunConfig.parse(other))
    reseeded = run_config(**{"lora.seed": 1})
    fedavg = RunConfig.parse({**reseeded, "server.aggregation": "fedavg"})
    with pytest.raises(UserError, match="A factors are not the shared seed's"):
        load_initial(str(out), seeded_adapter(reseeded), RunConfig.parse(reseeded))
    load_initial(str(out), seeded_adapter(reseeded), fedavg)  # both factors travel: any A will do
    label = run_config(**{"data.task": "label", "data.verbalizers": "0=no,1=yes"})
    with pytest.raises(UserError, match="warm-started for a sft task; this run is label"):
        load_initial(str(out), seeded, RunConfig.parse(label))


def test_a_swapped_adapter_file_is_refused(warm, tmp_path):
    """warm_start.json names the adapter it describes: another adapter under it is not that warm start."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = warm
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = load_file(str(copy / "adapter_model.safetensors"))
    name = next(k for k in state if ".lora_B." in k)
    state[name] = state[name] * 2
    save_file(state, str(copy / "adapter_model.safetensors"))
    config = run_config()
    with pytest.raises(UserError, match="describes another adapter"):
        load_initial(str(copy), seeded_adapter(config), RunConfig.parse(config))
    state[name] = state[name] * float("nan")
    save_file(state, str(copy / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="NaN or infinite"):
        load_initial(str(copy), seeded_adapter(config), RunConfig.parse(config))


def test_a_warm_start_never_writes_into_a_used_directory(warm, tmp_path):
    out, _ = warm
    with pytest.raises(UserError, match="not empty"):
        warm_start(str(tmp_path / "x.jsonl"), str(out), SETTINGS, scenario="tiny", steps=1)
