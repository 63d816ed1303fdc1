import json

import pytest

from client.data import (
    DataSpec,
    check_fields,
    load_local_data,
    partition,
    split,
)
from client.records import read_table
from fedslm.common.config import resolve
from fedslm.common.errors import UserError


def spec_for(path, **overrides):
    return DataSpec.from_config(resolve({"data.path": str(path), **overrides}))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"question": f"q{i}", "answer": f"a{i}", "source": "AB"[i % 2], "label": i % 3} for i in range(60)]


def test_reads_jsonl_csv_tsv_parquet(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(tmp_path / "d.csv", index=False)
    table.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    table.to_parquet(tmp_path / "d.parquet")
    for name in (jsonl, tmp_path / "d.csv", tmp_path / "d.tsv", tmp_path / "d.parquet"):
        loaded = read_table(str(name))
        assert len(loaded) == 60 and loaded[3]["question"] == "q3", name


def test_jsonl_is_read_without_datasets_and_fills_missing_fields(tmp_path):
    """A phone reads its own JSONL file: no pyarrow/pandas in its process, and rows as datasets gives them."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "n": 1}, {"text": "b", "extra": [1, 2]}])
    code = ("import sys; from client.records import read_table; t = read_table(sys.argv[1]); "
            "print(t.column_names, list(t), 'datasets' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['text', 'n', 'extra'] [{'text': 'a', 'n': 1, 'extra': None}, "
                           "{'text': 'b', 'n': None, 'extra': [1, 2]}] False False")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": }\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 3 is not valid JSON"):
        read_table(str(path))


@pytest.mark.parametrize("content, message", [(None, "not found"), ("", "holds no records")])
def test_missing_or_empty_file(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_table(str(path))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported type '.xlsx'"):
        read_table(str(tmp_path / "x.xlsx"))


def test_missing_field_names_field_and_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = spec_for(path, **{"data.response-field": "reply"})
    with pytest.raises(UserError, match=r"field 'reply' \(data.response-field\) is missing"):
        check_fields(read_table(str(path)), spec)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_partitions_are_disjoint_and_complete(tmp_path, scheme):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = spec_for(path, **{"data.partition": scheme, "data.partition-by": "source" if scheme == "natural" else "label"})
    table = read_table(str(path))
    parts = [partition(table, spec, i, 2) for i in range(2)]
    seen = [r["question"] for p in parts for r in p]
    assert sorted(seen) == sorted(r["question"] for r in ROWS)
    if scheme == "natural":
        assert [set(p["source"]) for p in parts] in ([{"A"}, {"B"}], [{"B"}, {"A"}])


def test_natural_partition_needs_one_client_per_group(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match="has 2 groups but the federation has 3 clients"):
        partition(read_table(str(path)), spec_for(path, **{"data.partition": "natural", "data.partition-by": "source"}),
                  0, 3)


def test_empty_partition_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    spec = spec_for(path, **{"data.partition": "iid"})
    with pytest.raises(UserError, match="partition 4 of 5 is empty"):
        partition(read_table(str(path)), spec, 4, 5)


def test_split_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = spec_for(path, **{"data.test-fraction": 0.25, "data.partition": "iid"})
    a, b = split(ROWS, spec, "x"), split(ROWS, spec, "x")
    assert a == b and len(a.test) == 15 and len(a.train) == 45
    assert not {r["question"] for r in a.test} & {r["question"] for r in a.train}


def test_local_data_is_named_after_its_natural_group(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    local = load_local_data(spec_for(path, **{"data.partition": "natural", "data.partition-by": "source"}), 1, 2)
    assert local.name in {"A", "B"} and all(r["source"] == local.name for r in local.train + local.test)


def label_csv(path, labels, per_label=4):
    path.write_text("label,text\n" + "".join(f"{label},record {i} about {label}\n"
                                             for label in labels for i in range(per_label)))
    return path


def test_word_labels_become_sorted_verbalizers_and_given_ones_must_cover_every_label(tmp_path):
    from client.data import resolve_verbalizers

    path = label_csv(tmp_path / "d.csv", ["Flu", "Acne", "Asthma"])
    table = read_table(str(path))
    assert resolve_verbalizers(spec_for(path, **{"data.task": "label"}), table) == "Acne=Acne,Asthma=Asthma,Flu=Flu"
    given = spec_for(path, **{"data.task": "label", "data.verbalizers": "Flu=flu,Acne=acne"})
    with pytest.raises(UserError, match=r"^config key 'data.verbalizers': labels Asthma in data file .* have no "):
        resolve_verbalizers(given, table)
    numeric = label_csv(tmp_path / "n.csv", [0, 1])
    with pytest.raises(UserError, match="labels 0, 1 .* are not words"):
        resolve_verbalizers(spec_for(numeric, **{"data.task": "label"}), read_table(str(numeric)))


def test_a_missing_label_field_or_an_empty_value_is_named(tmp_path):
    path = label_csv(tmp_path / "d.csv", ["Flu", "Acne"])
    spec = spec_for(path, **{"data.task": "label", "data.label-field": "diagnosis"})
    with pytest.raises(UserError, match=r"field 'diagnosis' \(data.label-field\) is missing; columns are label, text"):
        check_fields(read_table(str(path)), spec)
    holes = write_jsonl(tmp_path / "h.jsonl", [{"question": "q", "answer": "a"}, {"question": " ", "answer": "a"}])
    with pytest.raises(UserError, match=r"record 2 has an empty 'question' \(data.prompt-field\)"):
        check_fields(read_table(str(holes)), spec_for(holes))


def test_a_separate_eval_file_is_partitioned_and_all_of_the_train_file_trains(tmp_path):
    """data.eval-path (a benchmark's dev set): each client evaluates its share of it, together all of it once."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{**r, "question": f"dev{i}"} for i, r in enumerate(ROWS[:21])])
    spec = spec_for(train, **{"data.eval-path": str(dev), "data.max-eval-examples": 0, "data.partition": "iid"})
    parts = [load_local_data(spec, i, 3) for i in range(3)]
    assert sum(len(p.train) for p in parts) == 60
    assert sorted(r["question"] for p in parts for r in p.test) == sorted(f"dev{i}" for i in range(21))
    with pytest.raises(UserError, match=r"dev2.jsonl: field 'answer' \(data.response-field\) is missing"):
        load_local_data(spec_for(train, **{"data.eval-path": str(write_jsonl(tmp_path / "dev2.jsonl",
                                                                                [{"question": "q"}]))}), 0, 3)


def test_a_file_without_the_partition_column_suggests_the_fix(tmp_path):
    """Issue 27 item 5: `fedslm data my.jsonl` on any file without a `source` column named no way out."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in ROWS])
    with pytest.raises(UserError) as err:
        partition(read_table(str(path)), spec_for(path, **{"data.partition": "natural", "data.partition-by": "source"}),
                  0, 2)
    message = str(err.value)
    assert "field 'source' (data.partition-by, one client per value) is missing; columns are question, answer" in message
    assert "--set data.partition=iid" in message and "\n" not in message


def test_no_data_path_is_an_error_naming_the_key_never_the_demo():
    """A client reads the file it is given: an empty data.path no longer falls back to the hospital demo's records
    inside the site's reader (issue 26); the demo's file is the scenarios' package data, named by them."""
    from simulation.scenarios import DEMO_DATA, PHONE_DATA, get_scenario

    with pytest.raises(UserError, match=r"config key 'data.path': no data file given \(a deployed site names"):
        load_local_data(DataSpec.from_config(resolve()), 0, 1)
    assert DEMO_DATA.parent.name == "examples" and DEMO_DATA.parent.parent.name == "simulation"
    assert DEMO_DATA.is_file() and PHONE_DATA.parent == DEMO_DATA.parent
    assert get_scenario("hospital").overrides["data.path"] == get_scenario("tiny").overrides["data.path"] == str(DEMO_DATA)
    assert not (DEMO_DATA.parents[2] / "client" / "examples").exists()
