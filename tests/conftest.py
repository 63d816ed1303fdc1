"""Shared fixtures: an isolated model cache and the tiny model with a fresh adapter."""

import os

import pytest

from slm.quiet import quiet_libraries

quiet_libraries()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One cache per test session, so a test run never depends on (or pollutes) ~/.cache.

    FEDSLM_TEST_CACHE reuses a cache across sessions (saves the ~30 s GGUF conversion
    when iterating locally); CI leaves it unset.
    """
    path = os.environ.get("FEDSLM_TEST_CACHE") or str(tmp_path_factory.mktemp("fedslm-cache"))
    old = os.environ.get("FEDSLM_CACHE")
    os.environ["FEDSLM_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("FEDSLM_CACHE", None)
    else:
        os.environ["FEDSLM_CACHE"] = old


@pytest.fixture
def config():
    from fedslm.common.config import resolve

    return resolve({"model.name": "tiny", "model.max-length": 48, "lora.dropout": 0.0})


@pytest.fixture
def tiny(config):
    """(model, tokenizer) of the tiny Llama with the initial adapter restored."""
    from slm.lora import LoraSpec, attach, set_adapter_state

    model, tokenizer = attach("tiny", LoraSpec.from_config(config))
    model._fedslm_initial = model.initial_adapter  # recorded by attach: earlier tests may have trained the model
    set_adapter_state(model, model.initial_adapter)
    return model, tokenizer


@pytest.fixture
def qa_records():
    return [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a rare disorder {'of the heart ' * (i % 4)}."}
            for i in range(24)]
