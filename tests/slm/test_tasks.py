import pytest

from fedslm.common.errors import UserError
from slm.batch import collate, per_example_loss
from slm.tasks import (
    IGNORE,
    Task,
    check_template,
    derive_verbalizers,
    encode,
    encode_candidates,
    parse_verbalizers,
    prompt_ids,
)


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
    task = Task(kind="sft", max_length=80)
    ex = encode(task, tok, {"question": "x" * 500, "answer": "y" * 500})
    assert len(ex.input_ids) == 80 and ex.cut
    assert sum(label != IGNORE for label in ex.labels) == 40


def test_a_long_sft_prompt_is_cut_in_the_middle_never_its_template_or_instruction(tiny):
    """Issue 27 item 6: the prompt's last tokens were kept, losing <|im_start|>user and the instruction."""
    _, tok = tiny
    task = Task(kind="sft", max_length=200, prompt_template="Answer as a nurse would.\n{prompt}")
    question = "START " + " ".join(f"w{i}" for i in range(300)) + " END?"
    ex = encode(task, tok, {"question": question, "answer": "fine"})
    prompt = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE])
    assert prompt.startswith("<|im_start|>user") and "Answer as a nurse would." in prompt
    assert "START" in prompt and "END?" in prompt and "…" in prompt and "w150" not in prompt
    assert ex.cut and len(ex.input_ids) <= 200
    short = encode(task, tok, {"question": "Why?", "answer": "fine"})
    assert not short.cut and "…" not in tok.decode(short.input_ids)


def test_label_task_scores_the_verbalizer(tiny):
    _, tok = tiny
    task = Task(kind="label", max_length=128, verbalizers=parse_verbalizers("0=no,1=yes"))
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


# A chat template that, like SmolLM2's, injects a default system prompt when none is given.
DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def smollm_like_tokenizer():
    from slm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = DEFAULT_SYSTEM
    return tokenizer


def test_a_label_prompt_names_the_candidates_without_the_default_system_prompt(smollm_like_tokenizer):
    tok = smollm_like_tokenizer
    task = Task(kind="label", max_length=200, verbalizers=parse_verbalizers("0=no,1=yes"))
    ids = prompt_ids(task, tok, {"text": "Is it?"})
    text = tok.decode(ids)
    assert "helpful AI assistant" not in text
    assert "Classify the text into one of: no, yes.\n\nText: Is it?" in text
    for value in ("0", "1"):  # every candidate of a record has the same prompt (label scoring compares them)
        example = encode(task, tok, {"text": "Is it?", "label": value})
        assert example.input_ids[: len(ids)] == ids and example.labels[: len(ids)] == [IGNORE] * len(ids)
    sft = encode(Task(kind="sft", max_length=200), tok, {"question": "Why?", "answer": "b"})
    assert "helpful AI assistant" in tok.decode(sft.input_ids)  # sft keeps the chat template as it is


def test_a_long_text_is_cut_but_never_the_instruction_or_the_verbalizer(tiny):
    _, tok = tiny
    task = Task(kind="label", max_length=96, verbalizers=parse_verbalizers("a=alpha,b=beta"),
                prompt_template="{text}\nOne of: {labels}?")
    example = encode(task, tok, {"text": "word " * 200, "label": "b"})
    assert len(example.input_ids) == 96 - 1  # room is kept for the longest verbalizer, alpha
    assert "One of: alpha, beta?" in tok.decode(example.input_ids)
    assert tok.decode([t for t in example.labels if t != IGNORE][:-1]) == "beta"
    with pytest.raises(UserError, match="model.max-length"):
        encode(Task(kind="label", max_length=40, verbalizers=task.verbalizers), tok, {"text": "x", "label": "a"})


def test_candidates_are_the_record_encoded_with_each_label(tiny):
    """Label scoring builds the prompt once; each candidate must be exactly encode() with that label."""
    _, tok = tiny
    task = Task(kind="label", max_length=128, verbalizers=parse_verbalizers("a=alpha,b=beta gamma,c=c"))
    for text in ("short", "word " * 100):  # the second is cut to fit the window
        record = {"text": text, "label": "a"}
        expected = [encode(task, tok, {**record, "label": value}) for value, _ in task.verbalizers]
        assert encode_candidates(task, tok, record) == expected


@pytest.mark.parametrize("kind, template, words", [
    ("label", "{txt} {labels}", "unknown placeholder {txt}"),
    ("label", "{text} {}", "unknown placeholder {}"),
    ("label", "just {labels}", "must contain {text}"),
    ("sft", "{text}", "a sft task knows {prompt}"),
    ("label", "{text", "literal brace"),
    ("next-word", "{text}", "takes no prompt template"),
])
def test_a_bad_prompt_template_is_one_line_naming_the_key(kind, template, words):
    with pytest.raises(UserError) as err:
        check_template(kind, template)
    assert "data.prompt-template" in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, template, words", [
    ("label", "{text:>100000000} {labels}", "{text:>100000000} has a format spec"),  # a 100 MB string per record
    ("label", "{text} {labels:x<5}", "{labels:x<5} has a format spec"),
    ("label", "{text:{labels}}", "{text:{labels}} has a format spec"),
    ("label", "{text!r} {labels}", "{text!r} has a conversion"),
    ("sft", "{prompt!s}", "{prompt!s} has a conversion"),
    ("label", "{text.__class__} {labels}", "{text.__class__} looks up an attribute or index"),
    ("label", "{text} {labels[0]}", "{labels[0]} looks up an attribute or index"),
    ("sft", "{prompt.__init__.__globals__}", "{prompt.__init__.__globals__} looks up an attribute or index"),
])
def test_a_template_is_plain_placeholders_only(kind, template, words):
    """A coordinator's template must not make a site build huge strings or reach into objects: {name}, nothing else."""
    with pytest.raises(UserError) as err:
        check_template(kind, template)
    message = str(err.value)
    assert message.startswith("config key 'data.prompt-template': ") and words in message and "\n" not in message
    assert message.endswith("write a placeholder as {name} only")


def test_plain_placeholders_and_literal_braces_pass():
    assert check_template("label", "{{x}} {text}: {labels}?") == "{{x}} {text}: {labels}?"
    assert check_template("sft", "Q: {prompt}\nA:") == "Q: {prompt}\nA:"


def test_word_labels_are_their_own_verbalizers_numbers_are_not():
    assert derive_verbalizers([" Flu", "Acne", "Heart disease", "Acne"], "f") == \
        "Acne=Acne,Flu=Flu,Heart disease=Heart disease"
    with pytest.raises(UserError, match="labels 0, 1 in data file x.tsv are not words; give value=word pairs, "
                                        "e.g. 0=negative,1=positive"):
        derive_verbalizers([0, 1, 1], "data file x.tsv")
    with pytest.raises(UserError, match="at least two labels, found 'Flu'"):
        derive_verbalizers(["Flu", "Flu"], "f")
