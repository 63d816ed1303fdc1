import pytest

from slm.errors import UserError
from slm.tasks import IGNORE, Task, collate, encode, parse_verbalizers, per_example_loss


def test_sft_loss_only_on_response_and_end_of_turn(tiny):
    _, tok = tiny
    task = Task(kind="sft", max_length=200)
    ex = encode(task, tok, {"question": "Why?", "answer": "Because."})
    prompt = tok.apply_chat_template([{"role": "user", "content": "Why?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    assert ex.input_ids[: len(prompt)] == list(prompt)
    assert ex.labels[: len(prompt)] == [IGNORE] * len(prompt)
    response = ex.labels[len(prompt):]
    assert tok.decode(response[:-1]) == "Because." and response[-1] == tok.eos_token_id
    assert response == ex.input_ids[len(prompt):]


def test_sft_truncation_keeps_half_the_window_for_the_response(tiny):
    _, tok = tiny
    task = Task(kind="sft", max_length=40)
    ex = encode(task, tok, {"question": "x" * 500, "answer": "y" * 500})
    assert len(ex.input_ids) == 40
    assert sum(label != IGNORE for label in ex.labels) == 20


def test_label_task_scores_the_verbalizer(tiny):
    _, tok = tiny
    task = Task(kind="label", max_length=64, verbalizers=parse_verbalizers("0=no,1=yes"))
    ex = encode(task, tok, {"text": "Is it?", "label": 1})
    target = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(target[:-1]) == "yes"
    with pytest.raises(UserError, match="label '2' has no verbalizer"):
        encode(task, tok, {"text": "Is it?", "label": 2}, where="line 7")


def test_next_word_has_loss_on_every_token_but_the_first(tiny):
    _, tok = tiny
    ex = encode(Task(kind="next-word", max_length=10), tok, {"text": "To be or not to be"})
    assert len(ex.input_ids) == 10 and ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_empty_field_is_named(tiny):
    _, tok = tiny
    with pytest.raises(UserError, match="record #3: field 'answer' is empty"):
        encode(Task(kind="sft", max_length=32), tok, {"question": "q", "answer": " "}, where="#3")


@pytest.mark.parametrize("text", ["", "0=no", "0=no,1"])
def test_bad_verbalizers(text):
    with pytest.raises(UserError, match="data.verbalizers"):
        parse_verbalizers(text)


def test_padding_does_not_change_per_example_loss(tiny):
    """Right padding + attention mask: an example's loss is the same alone or in a batch."""
    model, tok = tiny
    task = Task(kind="sft", max_length=48)
    short = encode(task, tok, {"question": "a?", "answer": "b"})
    long = encode(task, tok, {"question": "a longer question?", "answer": "a longer answer"})
    batch = collate([short, long], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    both = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    alone = collate([short], tok.pad_token_id)
    single = per_example_loss(model(input_ids=alone["input_ids"]).logits, alone["labels"])
    assert abs(float(both[0]) - float(single[0])) < 1e-5
