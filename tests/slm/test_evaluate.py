"""Evaluation computes logits in chunks of loss positions: the metrics of the full (B, T, V) logits."""

import pytest
import torch

from slm.batch import collate, token_losses
from slm.evaluate import evaluate
from slm.tasks import Task, encode


@pytest.mark.parametrize("kind", ["next-word", "sft"])
def test_chunked_metrics_are_those_of_the_full_logits(tiny, config, qa_records, monkeypatch, kind):
    import slm.evaluate

    monkeypatch.setattr(slm.evaluate, "CHUNK", 7)  # several chunks per batch, an uneven last one
    model, tokenizer = tiny
    task = Task(kind=kind, max_length=config["model.max-length"], text_field="question")
    records = qa_records[:10]
    batch = collate([encode(task, tokenizer, r) for r in records], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, mask = token_losses(logits, batch["labels"])
    best3 = logits[:, :-1].topk(3, dim=-1).indices  # (B, T-1, 3)
    target = batch["labels"][:, 1:]
    metrics = evaluate(model, tokenizer, task, records, batch_size=4)
    assert metrics["eval_tokens"] == int(mask.sum()) > 7
    assert metrics["eval_loss"] == pytest.approx(float(losses.sum() / mask.sum()), rel=1e-5)
    if kind == "next-word":
        assert metrics["top1_accuracy"] == float(((best3[..., 0] == target) & mask).sum() / mask.sum())
        assert metrics["top3_accuracy"] == float(((best3 == target.unsqueeze(-1)).any(-1) & mask).sum() / mask.sum())
