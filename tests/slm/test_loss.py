"""The chunked loss (slm/loss.py) is the full-logits loss, per example and per-example gradient."""

import pytest
import torch
from opacus import GradSampleModule

from slm.batch import collate
from slm.loss import full_logits_loss, per_example_loss
from slm.tasks import IGNORE, Task, encode


def _batch(tok, records, kind="sft"):
    task = Task(kind=kind, max_length=48)
    if kind == "next-word":
        records = [{"text": r["answer"]} for r in records]
    return collate([encode(task, tok, r) for r in records], tok.pad_token_id)


def _nonzero_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["sft", "next-word"])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(tiny, qa_records, kind):
    """Chunks of 5 positions (many chunks, one partial): same losses and adapter gradients to 1e-5."""
    model, tok = tiny
    _nonzero_b(model)
    batch = _batch(tok, qa_records[:5], kind)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for loss in (full_logits_loss, lambda m, b: per_example_loss(m, b, chunk=5)):
        losses = loss(model, batch)
        results.append((losses.detach(), torch.autograd.grad(losses.mean(), params)))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for c, f in zip(chunked_grads, full_grads):
        torch.testing.assert_close(c, f, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_example_gradients_are_unchanged(tiny, qa_records, mode):
    """The hooks on the LoRA layers fire when the body is called inside GradSampleModule: grad_sample equal."""
    model, tok = tiny
    _nonzero_b(model)
    batch = _batch(tok, qa_records[:4])
    batch["labels"][1] = IGNORE  # an example without loss tokens: zero per-example gradient either way
    model.train()
    samples = []
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    try:
        for loss in (full_logits_loss, lambda m, b: per_example_loss(m, b, chunk=7)):
            loss(forward, batch).mean().backward()
            samples.append([p.grad_sample.clone() for p in model.parameters() if p.requires_grad])
            forward.zero_grad(set_to_none=True)
    finally:
        forward._close()
        model.eval()
    assert any(float(s.abs().max()) > 0 for s in samples[0])
    for c, f in zip(samples[1], samples[0]):
        assert c.shape[0] == 4
        torch.testing.assert_close(c, f, rtol=1e-5, atol=1e-7)


def test_int8_base_with_tied_head(config, qa_records):
    """The int8 base (tied Int8Linear head, frozen) gives the same loss chunked as through full logits."""
    from slm.lora import LoraSpec, attach

    model, tok = attach("tiny", LoraSpec.from_config(config), "int8")
    lm = model.get_base_model()
    assert lm.config.tie_word_embeddings
    batch = _batch(tok, qa_records[:3])
    torch.testing.assert_close(per_example_loss(model, batch, chunk=4), full_logits_loss(model, batch),
                               rtol=1e-5, atol=1e-6)


def test_a_batch_without_loss_tokens_still_backpropagates(tiny, qa_records):
    model, tok = tiny
    batch = _batch(tok, qa_records[:2])
    batch["labels"][:] = IGNORE
    losses = per_example_loss(model, batch)
    losses.mean().backward()
    assert torch.equal(losses.detach(), torch.zeros(2))
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode, clip", [("hooks", 0.05), ("hooks", 1e3), ("ghost", 0.05)])
def test_one_dp_step_at_zero_noise_is_unchanged(tiny, qa_records, mode, clip):
    """client.train.take_step with the chunked loss gives the full-logits loss's update (to 1e-5).

    C = 0.05 clips every example (the update sees each gradient's direction); C = 1e3 clips
    none (it sees their scale too).
    """
    from client.train import make_private, take_step
    from privacy.mechanism.randomness import DpRandom, seed_key
    from slm.lora import set_adapter_state

    model, tok = tiny
    batch = _batch(tok, qa_records[:5])
    params = [p for p in model.parameters() if p.requires_grad]
    updates = []
    for loss in (full_logits_loss, lambda m, b: per_example_loss(m, b, chunk=6)):
        set_adapter_state(model, model._fedslm_initial)
        _nonzero_b(model)
        before = [p.detach().clone() for p in params]
        model.train()
        forward, optimizer = make_private(model, torch.optim.SGD(params, lr=1.0), mode=mode, noise_multiplier=0.0,
                                          clip_norm=clip, batch_size=5, dp_random=DpRandom(seed_key(0)))
        try:
            take_step(forward, optimizer, batch, mode=mode, loss=loss)
        finally:
            optimizer.zero_grad(set_to_none=True)
            forward._close()
            model.eval()
        updates.append([b - p.detach() for p, b in zip(params, before)])
    assert any(float(u.abs().max()) > 0 for u in updates[0])
    for c, f in zip(updates[1], updates[0]):
        torch.testing.assert_close(c, f, rtol=1e-5, atol=1e-8)
