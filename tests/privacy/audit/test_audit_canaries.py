"""Canaries and exposure: seeded generation, the cached scoring path against whole records, the exposure formulas."""

import math

import numpy as np
import pytest
import torch

from privacy.audit.canaries import (
    candidate_secrets,
    digit_token_ids,
    exposure,
    log_perplexities,
    make_canaries,
    score_canaries,
    summarize,
)
from privacy.audit.run import _check_fits
from slm.batch import collate, per_example_loss, token_losses
from slm.tasks import Task, encode

TASK = Task(kind="sft", max_length=128)


def test_canaries_are_seeded_distinct_and_included_independently_of_the_secrets():
    one, again = make_canaries(200, digits=8, seed=3), make_canaries(200, digits=8, seed=3)
    assert one == again and one != make_canaries(200, digits=8, seed=4)
    assert len(set(one.keys)) == 200 and all(len(s) == 8 and s.isdigit() for s in one.secrets)
    assert 70 < sum(one.included) < 130
    # inclusion comes from its own stream: other secrets, same coin flips
    assert make_canaries(200, digits=4, seed=3).included == one.included
    assert one.space_log2 == pytest.approx(8 * math.log2(10))
    record = one.record(TASK, 5)
    assert record == {"question": f"Patient {one.keys[5]}: what is the access code?", "answer": one.secrets[5]}
    candidates = candidate_secrets(one, 5, 50)
    assert len(candidates) == 50 and not set(candidates) & set(one.secrets)
    assert candidates == candidate_secrets(one, 5, 50) != candidate_secrets(one, 6, 50)


def test_cached_log_perplexities_equal_whole_records(tiny):
    """The shared-prompt KV cache (and right padding, and chunking) changes nothing."""
    model, tokenizer = tiny
    canaries = make_canaries(4, digits=6, seed=0)
    prompt = canaries.record(TASK, 0)
    secrets = [canaries.secrets[0], "12", "987654321", *candidate_secrets(canaries, 0, 6)]  # unequal lengths too
    cached = log_perplexities(model, tokenizer, TASK, prompt, secrets, batch_size=3)
    with torch.no_grad():
        batch = collate([encode(TASK, tokenizer, {**prompt, "answer": s}) for s in secrets], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, _ = token_losses(logits, batch["labels"])
    whole = (losses.sum(dim=1) / math.log(2)).tolist()
    assert cached == pytest.approx(whole, rel=1e-4)


def test_scores_are_the_training_loss_and_the_digit_likelihood_ratio(tiny):
    model, tokenizer = tiny
    canaries = make_canaries(5, digits=4, seed=1)
    ids = digit_token_ids(tokenizer)
    losses, scores = score_canaries(model, tokenizer, TASK, canaries, batch_size=2)
    for i in range(5):
        example = encode(TASK, tokenizer, canaries.record(TASK, i))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits
        assert losses[i] == pytest.approx(float(per_example_loss(logits, torch.tensor([example.labels]))[0]), rel=1e-5)
        start = example.labels.index(ids[canaries.secrets[i][0]])  # the first digit is the first response token
        ratios = []
        for j, digit in enumerate(canaries.secrets[i]):
            logp = torch.log_softmax(logits[0, start - 1 + j], dim=-1)
            ratios.append(float(logp[ids[digit]] - sum(logp[ids[d]] for d in "0123456789") / 10))
        assert scores[i] == pytest.approx(sum(ratios) / len(ratios), abs=1e-5)


def test_a_tokenizer_that_merges_digits_is_refused():
    class Merging:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2] if text == "7" else [1]}

    with pytest.raises(ValueError, match="digit '7'"):
        digit_token_ids(Merging())


def test_sampled_exposure_is_the_rank_among_the_sample():
    candidates = [float(x) for x in range(1, 128)]  # n = 127
    assert exposure(0.5, candidates, 20.0).sampled == pytest.approx(7.0)  # best of 128: log2(128)
    assert exposure(1000.0, candidates, 20.0).sampled == pytest.approx(0.0)  # worst
    assert exposure(63.5, candidates, 20.0).sampled == pytest.approx(1.0)  # 63 below: rank 64 of 128
    assert exposure(63.0, candidates, 20.0).sampled == pytest.approx(1.0)  # a tie counts against the canary


def test_extrapolated_exposure_follows_the_fitted_distribution_and_is_capped():
    rng = np.random.default_rng(0)
    candidates = rng.normal(50.0, 5.0, 2000).tolist()
    three_sigma = exposure(35.0, candidates, 40.0)
    assert three_sigma.extrapolated == pytest.approx(-math.log2(0.0013499), abs=0.6)
    assert three_sigma.sampled <= math.log2(2001)
    assert exposure(-1e6, candidates, 26.6).extrapolated == pytest.approx(26.6)
    assert exposure(1e6, candidates, 26.6).extrapolated == pytest.approx(0.0, abs=1e-9)
    # a secret like any other is at about the median: about 1 bit
    assert 0.5 < exposure(50.0, candidates, 40.0).extrapolated < 1.5


def test_a_canary_that_would_be_truncated_is_refused(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match="model.max-length"):
        _check_fits(tokenizer, Task(kind="sft", max_length=40), make_canaries(4, digits=8, seed=0))
    _check_fits(tokenizer, TASK, make_canaries(4, digits=8, seed=0))


def test_summary_of_nothing_is_empty():
    assert summarize([]) == {"count": 0, "mean": None, "median": None, "min": None, "max": None}
    assert summarize([1.0, 3.0, 2.0]) == {"count": 3, "mean": 2.0, "median": 2.0, "min": 1.0, "max": 3.0}
