"""The window fitted to the data (slm/window.py): the 95th-percentile example held, a label list that does not
fit dropped, never the text; and without data, a list that would take more than half the window dropped."""

from fedslm.common.config import resolve
from fedslm.common.vocabulary import RunConfig
from slm.tasks import DEFAULT_TEMPLATES, UNLISTED_TEMPLATE, Task, encode, label_template, parse_verbalizers
from slm.tiny import build_tiny_tokenizer
from slm.window import fit

TOKENIZER = build_tiny_tokenizer()  # byte-level: a text of n ASCII bytes is n tokens


def texts(lengths):
    return [{"text": "x" * n} for n in lengths]


def next_word(**keys):
    return resolve({"model.name": "tiny", "data.task": "next-word", **keys})


def test_the_window_is_the_smallest_multiple_of_16_holding_the_95th_percentile_example():
    records = texts(range(10, 210, 10))  # 20 records: 11..201 tokens with the start token
    fitted = fit(RunConfig.parse(next_word(**{"model.max-length-cap": 512})), TOKENIZER, records)
    assert fitted.quantile_tokens == 191  # the 19th of 20 (nearest rank)
    assert fitted.max_length == 192 and fitted.fitted
    cut = [encode(Task(kind="next-word", max_length=fitted.max_length), TOKENIZER, r).cut for r in records]
    assert cut == [False] * 19 + [True]  # one in twenty


def test_the_cap_bounds_a_fitted_window_and_a_set_window_is_kept():
    records = texts(range(10, 210, 10))
    capped = fit(RunConfig.parse(next_word()), TOKENIZER, records)
    assert capped.max_length == 128  # the default cap
    assert capped.describe() == ("128 tokens, model.max-length-cap (95% of 20 sampled training records take at most "
                                 "191: a larger cap cuts fewer)")
    short = fit(RunConfig.parse(next_word()), TOKENIZER, texts([3] * 20))
    assert short.max_length == 16  # never below the key's floor
    set_by_user = fit(RunConfig.parse(next_word(**{"model.max-length": 48})), TOKENIZER, records)
    assert set_by_user.max_length == 48 and not set_by_user.fitted
    assert set_by_user.describe() == "48 tokens (model.max-length)"


LABELS = [f"condition{i:02d}" for i in range(24)]


def label_config(labels, **keys):
    return resolve({"model.name": "tiny", "data.task": "label", "model.max-length-cap": 256,
                    "data.verbalizers": ",".join(f"{label}={label}" for label in labels), **keys})


def label_records(labels):
    return [{"text": f"patient {i} has a short complaint", "label": labels[i % len(labels)]} for i in range(40)]


def test_a_label_list_that_fits_is_kept_and_one_that_does_not_is_dropped_never_the_text():
    few = fit(RunConfig.parse(label_config(LABELS[:2])), TOKENIZER, label_records(LABELS[:2]))
    assert few.label_list == "yes" and few.listed_tokens == 0
    many = fit(RunConfig.parse(label_config(LABELS)), TOKENIZER, label_records(LABELS))
    assert many.label_list == "no" and many.listed_tokens > 256 >= many.max_length
    assert "the labels are not listed in the prompt" in many.describe()
    task = Task.from_config({**label_config(LABELS), **many.settings()})
    assert task.prompt_template == UNLISTED_TEMPLATE
    examples = [encode(task, TOKENIZER, r) for r in label_records(LABELS)]
    assert not any(example.cut for example in examples)
    assert "patient 3 has a short complaint" in TOKENIZER.decode(examples[3].input_ids)


def test_a_users_own_template_is_never_changed():
    template = "{text}\nOne of: {labels}?"
    asked = RunConfig.parse(label_config(LABELS, **{"data.prompt-template": template}))
    fitted = fit(asked, TOKENIZER, label_records(LABELS))
    assert fitted.label_list == "auto" and fitted.listed_tokens == 0
    task = Task.from_config({**label_config(LABELS, **{"data.prompt-template": template}), **fitted.settings()})
    assert label_template(task, TOKENIZER) == template


def test_without_data_a_list_is_kept_only_when_it_leaves_half_the_window_to_the_text():
    def template(labels, window):
        task = Task(kind="label", max_length=window, label_list="auto",
                    verbalizers=parse_verbalizers(",".join(f"{label}={label}" for label in labels)))
        return label_template(task, TOKENIZER)

    assert template(LABELS[:2], 256) == DEFAULT_TEMPLATES["label"]
    assert template(LABELS, 256) == UNLISTED_TEMPLATE
    assert template(LABELS, 512) == UNLISTED_TEMPLATE  # the list alone is 310 bytes: under half is left to the text
    assert template(LABELS, 2048) == DEFAULT_TEMPLATES["label"]
