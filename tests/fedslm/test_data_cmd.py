"""`fedslm data FILE`: what each simulated client would get, with the tokenizer only."""

import pytest

from fedslm.cli.data import show_data
from fedslm.common.errors import UserError

LABELS = ["Psoriasis", "Acne", "Asthma", "Flu", "Migraine", "Eczema"]


def label_csv(path, labels=LABELS, per_label=6):
    path.write_text("label,text\n" + "".join(f"{label},patient {i} has signs of {label.lower()}\n"
                                             for i in range(per_label) for label in labels))
    return path

SETTINGS = ["model.name=tiny", "model.max-length=128", "data.task=label", "data.partition=natural",
            "data.partition-by=label", "data.prompt-template={text} ({labels})", "train.batch-size=1"]


def test_shows_each_clients_records_labels_token_lengths_and_an_example(tmp_path):
    text = show_data(str(label_csv(tmp_path / "d.csv")), SETTINGS, clients=len(LABELS), scenario="tiny")
    lines = text.splitlines()
    assert lines[0].startswith(f"data {tmp_path / 'd.csv'}: label task (text field 'text', label field 'label', "
                               "6 labels), natural split by 'label' over 6 clients")
    assert lines[1].endswith(",".join(f"{w}={w}" for w in sorted(LABELS)))
    acne = next(line for line in lines if line.startswith("Acne: "))
    assert acne.startswith("Acne: 5 train / 1 held out; tokens min ") and acne.endswith("label: Acne 6")
    assert "0 over the window 128" in acne
    example = text.split("as the model sees it; loss on the part after '>>>'):\n")[1]
    assert example.startswith("<|im_start|>user\npatient ") and "(Acne, Asthma, Eczema, Flu, Migraine, Psoriasis)" \
        in example and example.endswith("<|im_start|>assistant\n>>>Acne<|im_end|>")


def test_a_bad_file_is_one_line(tmp_path):
    path = label_csv(tmp_path / "d.csv", labels=["0", "1"])
    with pytest.raises(UserError, match="labels 0, 1 in data file .* are not words"):
        show_data(str(path), SETTINGS, clients=2, scenario="tiny")


def test_more_clients_than_records_names_both_counts_not_the_batch_size(tmp_path):
    path = label_csv(tmp_path / "d.csv", labels=["Flu", "Acne"], per_label=5)
    iid = [s for s in SETTINGS if not s.startswith("data.partition")] + ["data.partition=iid", "train.batch-size=4"]
    with pytest.raises(UserError) as err:
        show_data(str(path), iid, clients=1000, scenario="tiny")
    assert str(err.value) == (f"data file {path}: 10 records for 1000 clients, and each client needs at least 2 "
                              "(one to train, one to hold out): use --clients 5 or fewer, or give a file of at least "
                              "2000 records")
