"""Unit-level DP-SGD (client.unit_sgd): people sampled, each person's mean gradient clipped as one."""

import itertools

import pytest
import torch
from start_point import nonzero_lora_b

from client.train import train_adapter
from client.unit_sgd import sample_units, unit_bounds
from client.units import group_by_unit, largest_unit
from fedslm.common.errors import UserError
from privacy.mechanism.randomness import DpRandom, seed_key
from slm.batch import collate, per_example_loss
from slm.lora import adapter_state, set_adapter_state
from slm.tasks import Task, encode

TASK = Task(kind="sft", max_length=48)


def _with_patients(records, sizes):
    """``records`` labelled with patients holding ``sizes`` records each, interleaved in the file."""
    owners = [p for p, n in enumerate(sizes) for _ in range(n)]
    order = sorted(range(len(owners)), key=lambda i: (i % 3, i))  # a patient's records are not adjacent
    return [{**records[j], "patient_id": f"p{owners[i]}"} for j, i in enumerate(order)]


def test_grouping_keeps_every_record_and_refuses_a_record_without_a_unit(qa_records):
    rows = _with_patients(qa_records[:10], [4, 3, 2, 1])
    units = group_by_unit(rows, "patient_id")
    assert sorted(i for u in units for i in u) == list(range(10))
    assert sorted(len(u) for u in units) == [1, 2, 3, 4] and largest_unit(rows, "patient_id") == 4
    assert all(len({rows[i]["patient_id"] for i in u}) == 1 for u in units)
    assert group_by_unit(rows, "") == [[i] for i in range(10)]
    with pytest.raises(UserError, match="privacy unit field 'patient_id'"):
        group_by_unit([*rows, {**qa_records[0], "patient_id": " "}], "patient_id", "data file x.jsonl")


def test_sampling_keeps_at_most_k_records_of_each_unit_and_whole_units_in_micro_batches():
    units = [list(range(10 * u, 10 * u + n)) for u, n in enumerate([7, 1, 3, 12, 2])]
    rows, segments = sample_units(DpRandom(seed_key(3)), units, 1.0, 4)
    assert segments == sorted(segments) and len(set(segments)) == 5
    for position, u in enumerate(units):
        mine = [r for r, s in zip(rows, segments) if s == position]
        assert set(mine) <= set(u) and len(mine) == min(4, len(u)) and mine == sorted(mine)
    # different keys choose different subsets of a large unit (the choice is random, not the first k)
    choices = {tuple(sample_units(DpRandom(seed_key(s)), [list(range(12))], 1.0, 4)[0]) for s in range(8)}
    assert len(choices) > 1
    bounds = unit_bounds(segments, 5)
    assert bounds[0] == 0 and bounds[-1] == len(rows)
    for start, end in itertools.pairwise(bounds):
        assert end - start <= 5 or len(set(segments[start:end])) == 1  # only a lone unit may exceed the piece
        assert start == 0 or segments[start] != segments[start - 1]  # never inside a unit


def test_one_record_per_unit_is_the_record_level_step_draw_for_draw(tiny, qa_records):
    """Same key, one record per unit: the unit-level run must release exactly the record-level update."""
    model, tok = tiny
    rows = [{**r, "patient_id": f"p{i}"} for i, r in enumerate(qa_records[:12])]
    common = {"steps": 3, "batch_size": 4, "lr": 0.05, "noise_multiplier": 0.8, "clip_norm": 0.5, "seed": 11,
                  "physical_batch_size": 3}
    initial = adapter_state(model)
    train_adapter(model, tok, TASK, rows, **common)
    record_level = adapter_state(model)
    set_adapter_state(model, initial)
    train_adapter(model, tok, TASK, rows, units=group_by_unit(rows, "patient_id"), max_records_per_unit=2, **common)
    unit_level = adapter_state(model)
    assert any(not torch.equal(record_level[n], initial[n]) for n in initial)
    for name in initial:
        assert torch.equal(record_level[name], unit_level[name]), name


def _unit_gradient(model, tok, records, params):
    """The mean of the unit's per-example gradients, one example at a time (no Opacus)."""
    total = [torch.zeros_like(p) for p in params]
    for record in records:
        batch = collate([encode(TASK, tok, record)], tok.pad_token_id)
        loss = per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).mean()
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    return [t / len(records) for t in total]


@pytest.mark.parametrize("physical", [0, 2])
def test_each_units_mean_gradient_is_clipped_as_one_under_micro_batches(tiny, qa_records, physical):
    """sigma 0, q 1, k above every unit: the update is sum_u clip(mean of u's gradients) / units, by hand.

    With micro-batches of 2 a unit of 4 records runs in one piece; were units split or their
    records clipped one by one, the update would differ (the per-record clip is checked to differ).
    """
    model, tok = tiny
    rows = _with_patients(qa_records[:10], [4, 3, 2, 1])
    units = group_by_unit(rows, "patient_id")
    params, before = nonzero_lora_b(model)
    clip = 0.05
    expected, per_record = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    contributions = []
    for u in units:
        grads = _unit_gradient(model, tok, [rows[i] for i in u], params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        factor = min(1.0, clip / (norm + 1e-6))
        contributions.append(norm * factor)
        for e, g in zip(expected, grads):
            e += g * factor / len(units)
        for i in u:  # what record-level clipping would give, for contrast
            single = _unit_gradient(model, tok, [rows[i]], params)
            n = float(torch.sqrt(sum((g.double() ** 2).sum() for g in single)))
            for r, g in zip(per_record, single):
                r += g * min(1.0, clip / (n + 1e-6)) / len(units)
    assert max(contributions) <= clip * (1 + 1e-6) and max(contributions) > clip * 0.99  # some unit was clipped
    train_adapter(model, tok, TASK, rows, steps=1, batch_size=len(units), lr=1.0, noise_multiplier=0.0,
                  clip_norm=clip, seed=0, physical_batch_size=physical, units=units, max_records_per_unit=8,
                  make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    update = [b - p.detach() for p, b in zip(params, before)]
    for u, e in zip(update, expected):
        torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(u, r, rtol=1e-3, atol=1e-6) for u, r in zip(update, per_record))


def test_units_refuse_ghost_clipping_and_a_batch_above_the_unit_count(tiny, qa_records):
    model, tok = tiny
    rows = _with_patients(qa_records[:10], [4, 3, 2, 1])
    units = group_by_unit(rows, "patient_id")
    with pytest.raises(UserError, match="ghost cannot train with a privacy unit"):
        train_adapter(model, tok, TASK, rows, steps=1, batch_size=2, lr=0.01, noise_multiplier=1.0, clip_norm=1.0,
                      seed=0, grad_sample_mode="ghost", units=units, max_records_per_unit=2)
    with pytest.raises(UserError, match="4 training units"):
        train_adapter(model, tok, TASK, rows, steps=1, batch_size=5, lr=0.01, noise_multiplier=1.0, clip_norm=1.0,
                      seed=0, units=units, max_records_per_unit=2)


def test_unit_level_steps_run_unchanged_on_the_phone_profile(config, qa_records):
    """int8 base, decoder layers recomputed, one record per micro-batch: the same unit-level update as one piece."""
    from slm.lora import LoraSpec, attach
    from slm.recompute import recomputed_layers

    model, tok = attach("tiny", LoraSpec.from_config(config), "int8")  # cached: other tests get it back as found
    set_adapter_state(model, model.initial_adapter)
    rows = _with_patients(qa_records[:10], [4, 3, 2, 1])
    units = group_by_unit(rows, "patient_id")
    initial = adapter_state(model)
    common = dict(steps=2, batch_size=2, lr=0.05, noise_multiplier=0.7, clip_norm=0.5, seed=5, units=units,
                  max_records_per_unit=3)
    try:
        train_adapter(model, tok, TASK, rows, **common)
        one_piece = adapter_state(model)
        set_adapter_state(model, initial)
        with recomputed_layers(model):
            train_adapter(model, tok, TASK, rows, physical_batch_size=1, **common)
        phone = adapter_state(model)
    finally:
        set_adapter_state(model, model.initial_adapter)
    assert any(not torch.equal(one_piece[n], initial[n]) for n in initial)
    for name in initial:
        torch.testing.assert_close(phone[name], one_piece[name], rtol=1e-4, atol=1e-6)
