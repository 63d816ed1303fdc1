"""Merge + GGUF export of the real SmolLM2, and a client receiving a shipped file."""

import json

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_cache):
    from fedslm.common.config import resolve
    from fedslm.common.vocabulary import RunConfig
    from server.ship import build_artifacts
    from simulation.scenarios import DEMO_DATA
    from slm.base import resolve_model_dir
    from slm.lora import LoraSpec, adapter_state, attach, save_adapter

    config = resolve({"data.path": str(DEMO_DATA), "data.partition": "natural", "data.max-eval-examples": 4,
                      "lora.dropout": 0.0})
    run = tmp_path_factory.mktemp("ship") / "run"
    model, _ = attach("smollm2", LoraSpec.from_config(config))
    state = {k: (v if ".lora_A." in k else torch.randn_like(v) * 0.02) for k, v in adapter_state(model).items()}
    save_adapter(state, LoraSpec.from_config(config), str(resolve_model_dir("smollm2")), run / "adapters" / "round-1")
    (run / "config.json").write_text(json.dumps(config))
    artifacts = build_artifacts(run, RunConfig.parse(config), 1, ["q8_0", "f16"], eval_metrics={"eval_loss": 2.0})
    return run, config, {a.quant: a for a in artifacts}


def test_manifests_describe_the_files(exported):
    from slm.digest import sha256_of

    run, _, artifacts = exported
    for quant, artifact in artifacts.items():
        manifest = json.loads(artifact.path.with_suffix(".manifest.json").read_text())
        assert manifest["quantization"] == quant and manifest["round"] == 1 and manifest["run_id"] == "run"
        assert manifest["sha256"] == sha256_of(artifact.path) and manifest["bytes"] == artifact.path.stat().st_size
        assert manifest["base_model"] == "smollm2" and manifest["eval"] == {"eval_loss": 2.0}
    fp32 = (run / "model" / "merged" / "model.safetensors").stat().st_size
    assert artifacts["q8_0"].bytes / fp32 <= 0.27


def test_gguf_carries_tokenizer_and_chat_template_and_matches_the_merged_model(exported):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    run, _, artifacts = exported
    reader = GGUFReader(str(artifacts["f16"].path))
    assert "tokenizer.chat_template" in reader.fields and len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert reader.fields["general.file_type"].contents() == 1
    merged = AutoModelForCausalLM.from_pretrained(run / "model" / "merged").eval()
    ids = torch.tensor([[1, 504, 3073, 314, 7564, 28, 260, 2233]])
    with torch.no_grad():
        reference = merged(input_ids=ids).logits
        for quant, tolerance in (("f16", 0.1), ("q8_0", 1.0)):
            model = AutoModelForCausalLM.from_pretrained(run / "model", gguf_file=artifacts[quant].path.name).eval()
            logits = model(input_ids=ids).logits
            assert float((logits - reference).abs().max()) < tolerance, quant
            assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.85, quant


def test_client_verifies_stores_and_evaluates_a_shipment(exported, tmp_path):
    import numpy as np

    from client.data import DataSpec, load_local_data
    from client.shipment import receive_and_evaluate
    from fedslm.common.errors import UserError
    from fedslm.common.vocabulary import RunConfig

    run, config, artifacts = exported
    artifact = artifacts["q8_0"]
    config = {**config, "ship.dir": str(tmp_path)}
    local = load_local_data(DataSpec.from_config(config), 1, 4)
    announced = {"run-dir": str(run), "sha256": artifact.sha256, "bytes": artifact.bytes, "file": artifact.path.name}
    payload = np.fromfile(artifact.path, dtype=np.uint8)  # what the server's ship message carries
    path, metrics = receive_and_evaluate(payload, announced, RunConfig.parse(config), local)
    assert path == tmp_path / "GHR" / artifact.path.name and path.read_bytes() == artifact.path.read_bytes()
    assert 0 < metrics["eval_loss"] < 10 and metrics["eval_examples"] == 4

    with pytest.raises(UserError, match="does not match"):
        receive_and_evaluate(payload, {**announced, "sha256": "0" * 64}, RunConfig.parse(config), local)
    assert path.read_bytes() == artifact.path.read_bytes()  # nothing replaced
