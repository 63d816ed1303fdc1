"""Adapters in the top layers, the frozen layers below run once per record (slm/frozen_prefix.py):
the same losses, per-example gradients and DP-SGD steps as the whole model, and the frozen part is kept."""

import pytest
import torch
from opacus import GradSampleModule

import client.train
from client.train import train_adapter
from fedslm.common.errors import UserError
from slm.batch import collate
from slm.frozen_prefix import PrefixCache, cut, with_prefix
from slm.lora import LoraSpec, adapter_state, attach, set_adapter_state
from slm.loss import per_example_loss
from slm.tasks import Task, encode
from slm.unwrap import causal_lm


@pytest.fixture
def top(config):
    """The tiny Llama (2 layers) with adapters in its top layer only, a trained-looking adapter, no kept rows."""
    spec = LoraSpec.from_config({**config, "lora.layers": 1})
    model, tokenizer = attach("tiny", spec)
    generator = torch.Generator().manual_seed(0)
    set_adapter_state(model, {k: torch.randn(v.shape, generator=generator) * 0.1
                              for k, v in adapter_state(model).items()})  # B != 0: the adapter changes the output
    causal_lm(model)._fedslm_prefix_cache = PrefixCache()
    return model, tokenizer


def _batch(tokenizer, config, records):
    task = Task.from_config(config)
    return collate([encode(task, tokenizer, r) for r in records], tokenizer.pad_token_id)


def test_adapters_sit_in_the_top_layers_only(top):
    model, _ = top
    trained = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"1"} and cut(model) == 1


def test_more_layers_than_the_model_has_is_one_line(config):
    with pytest.raises(UserError, match=r"'lora.layers': 3 is more than the 2 decoder layers"):
        attach("tiny", LoraSpec.from_config({**config, "lora.layers": 3}))


def test_losses_are_those_of_the_whole_model(top, config, qa_records):
    model, tokenizer = top
    batch = _batch(tokenizer, config, qa_records[:6])  # lengths differ: padding in the kept rows
    with torch.no_grad():
        whole = per_example_loss(model, batch)
        prefixed = with_prefix(model, batch)
        assert prefixed["prefix_hidden"].shape[:2] == batch["input_ids"].shape
        torch.testing.assert_close(per_example_loss(model, prefixed), whole, rtol=1e-5, atol=1e-6)


def _grad_samples(model, batch) -> dict:
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.train()
    try:
        per_example_loss(forward, batch).mean().backward()
        return {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        for p in model.parameters():
            p.grad = None
        forward._close()
        model.eval()


def test_per_example_gradients_are_those_of_the_whole_model(top, config, qa_records):
    model, tokenizer = top
    batch = _batch(tokenizer, config, qa_records[:5])
    whole = _grad_samples(model, batch)
    prefixed = _grad_samples(model, with_prefix(model, batch))
    assert whole and whole.keys() == prefixed.keys()
    for name in whole:
        assert whole[name].shape[0] == 5 and whole[name].abs().sum() > 0
        torch.testing.assert_close(prefixed[name], whole[name], rtol=1e-4, atol=1e-6)


def test_dp_sgd_round_is_the_same_as_the_whole_model(top, config, qa_records, monkeypatch):
    """Same seed, noise on, micro-batches: the released adapter is the whole model's (up to float order)."""
    model, tokenizer = top
    task = Task.from_config(config)
    options = dict(steps=3, batch_size=4, lr=0.05, noise_multiplier=0.8, clip_norm=0.05, seed=3,
                   physical_batch_size=2)
    start = adapter_state(model)
    train_adapter(model, tokenizer, task, qa_records, **options)
    prefixed = adapter_state(model)
    set_adapter_state(model, start)
    monkeypatch.setattr(client.train, "with_prefix", lambda model, batch: batch)
    train_adapter(model, tokenizer, task, qa_records, **options)
    whole = adapter_state(model)
    assert any(not torch.equal(prefixed[k], start[k]) for k in start)
    for name in whole:
        torch.testing.assert_close(prefixed[name], whole[name], rtol=1e-4, atol=1e-5)


def test_the_frozen_layers_run_once_per_record(top, config, qa_records):
    model, tokenizer = top
    calls = []
    bottom = causal_lm(model).get_decoder().layers[0]
    handle = bottom.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        batch = _batch(tokenizer, config, qa_records[:4])
        with_prefix(model, batch)
        with_prefix(model, batch)  # every row kept: the bottom layer does not run again
        with_prefix(model, _batch(tokenizer, config, qa_records[2:6]))  # two new rows only
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training under bf16 autocast keeps its own rows
            kept = with_prefix(model, batch)["prefix_hidden"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with_prefix(model, batch)
    finally:
        handle.remove()
    assert calls == [4, 2, 4]
    assert not torch.equal(kept, with_prefix(model, batch)["prefix_hidden"])  # bf16 rows are not the fp32 ones


def test_the_cache_keeps_within_its_budget_least_recently_used_out():
    cache = PrefixCache(budget=3 * 4 * 10)  # three rows of 10 fp32 numbers
    rows = {k: torch.full((10,), float(k)) for k in range(4)}
    for k in range(3):
        cache.put((k,), rows[k])
    cache.get((0,))  # used: 1 is now the oldest
    cache.put((3,), rows[3])
    assert cache.get((1,)) is None and all(cache.get((k,)) is not None for k in (0, 2, 3))
    assert cache.used == 3 * 4 * 10
    cache.put((9,), torch.zeros(40))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get((9,)) is None and cache.used == 3 * 4 * 10


def test_label_scores_are_those_of_the_whole_model_computed_and_kept(top):
    """Label scoring's two passes (prompt with a KV cache, packed candidates) from the kept frozen part."""
    from slm.label_scoring import reference_scores, score_labels
    from slm.tasks import parse_verbalizers

    model, tokenizer = top
    task = Task(kind="label", max_length=200, verbalizers=parse_verbalizers("a=negative,b=neutral,c=positively glowing"))
    data = [{"text": t, "label": "abc"[i % 3]} for i, t in enumerate(["great", "dull and slow", "a film " * 20, "ok"])]
    with torch.no_grad():
        expected = reference_scores(model, tokenizer, task, data)
    cache = causal_lm(model)._fedslm_prefix_cache
    first = score_labels(model, tokenizer, task, data, batch_size=3)
    kept = cache.used
    again = score_labels(model, tokenizer, task, data, batch_size=3)
    assert kept > 0 and cache.used == kept  # the second evaluation ran on what the first kept
    for got in (first, again):
        torch.testing.assert_close(got.log_likelihoods, expected, rtol=1e-5, atol=1e-4)
