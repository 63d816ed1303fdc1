"""One-pass label scoring equals the K-pass definition (slm.label_scoring.reference_scores).

Same answers, log-likelihoods equal within fp32 tolerance, for K = 2 and K = 6, with
truncated prompts, multi-token verbalizers (the tiny tokenizer is byte-level: every
verbalizer is several tokens, some share their first ones), on the plain base and with
non-zero LoRA adapters attached; and a label task's eval loss is still the mean loss over
the true verbalizers' tokens.
"""

import pytest
import torch

from slm.base import load_base
from slm.batch import collate, token_losses
from slm.evaluate import evaluate
from slm.label_scoring import reference_scores, score_labels
from slm.lora import adapter_state, set_adapter_state
from slm.tasks import Task, encode, parse_verbalizers

VERBALIZERS = {
    2: "0=negative,1=positive",
    # shared first tokens (ne-, pos-), lengths 2 to 16 bytes
    6: "a=negative,b=neutral,c=positive,d=positively glowing,e=no,f=mixed feelings",
}


def records(k: int) -> list[dict]:
    values = [v for v, _ in parse_verbalizers(VERBALIZERS[k])]
    texts = ["great", "dull and slow", "I liked it " * 12, "meh.", "a film " * 30, "not bad at all, really",
             "worst", "x" * 5, "the acting was fine but the plot " * 4, "ok"]
    return [{"text": t, "label": values[i % len(values)]} for i, t in enumerate(texts)]


@pytest.fixture
def trained_adapter(tiny):
    """The tiny model with non-zero LoRA B factors: an adapter that changes the logits."""
    model, tok = tiny
    generator = torch.Generator().manual_seed(1)
    set_adapter_state(model, {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                              for k, v in adapter_state(model).items()})
    return model, tok


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("which", ["base", "lora"])
def test_one_pass_scores_equal_the_k_pass_reference(trained_adapter, k, which):
    model, tok = trained_adapter
    if which == "base":
        model = load_base("tiny").model
    task = Task(kind="label", max_length=160, verbalizers=parse_verbalizers(VERBALIZERS[k]))
    data = records(k)
    assert any(len(tok(r["text"])["input_ids"]) > task.max_length for r in data)  # prompts that must be truncated
    with torch.no_grad():
        expected = reference_scores(model, tok, task, data)
    got = score_labels(model, tok, task, data, batch_size=4)
    assert got.log_likelihoods.shape == (len(data), k)
    torch.testing.assert_close(got.log_likelihoods, expected, rtol=1e-5, atol=1e-4)
    assert got.answers == expected.argmax(dim=1).tolist()


def test_label_eval_loss_is_the_mean_loss_over_the_true_verbalizers(trained_adapter):
    model, tok = trained_adapter
    task = Task(kind="label", max_length=160, verbalizers=parse_verbalizers(VERBALIZERS[6]))
    data = records(6)
    batch = collate([encode(task, tok, r) for r in data], tok.pad_token_id)
    with torch.no_grad():
        losses, mask = token_losses(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])
        truth = [[v for v, _ in task.verbalizers].index(r["label"]) for r in data]
        accuracy = (reference_scores(model, tok, task, data).argmax(dim=1) == torch.tensor(truth)).float().mean()
    progress = []
    metrics = evaluate(model, tok, task, data, batch_size=4, on_progress=lambda done, total: progress.append(done))
    assert metrics["eval_loss"] == pytest.approx(float(losses.sum() / mask.sum()), rel=1e-5)
    assert metrics["eval_tokens"] == int(mask.sum()) and metrics["eval_examples"] == len(data)
    assert metrics["accuracy"] == pytest.approx(float(accuracy))
    assert progress == [4, 8, 10]
