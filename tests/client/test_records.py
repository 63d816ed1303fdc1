"""One reader contract for JSONL, CSV and TSV: UTF-8 with or without a BOM, anything else refused
at its line and byte offset; empty and header-only files, and missing columns, said in one line with the fix."""

import pytest

from client.data import DataSpec, check_fields
from client.records import read_table
from fedslm.common.config import resolve
from fedslm.common.errors import UserError

BOM = b"\xef\xbb\xbf"
LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def refused(path) -> str:
    with pytest.raises(UserError) as err:
        read_table(str(path))
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", b'{"question": "q", "answer": "a"}\n\n{"question": "' + LATIN1 + b'", "answer": "a"}\n'),
    ("d.csv", b"question,answer\nq,a\n" + LATIN1 + b",a\n"),
    ("d.tsv", b"question\tanswer\nq\ta\n" + LATIN1 + b"\ta\n"),
])
def test_latin1_is_refused_with_file_line_and_offset_never_replaced(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    assert refused(path) == (f"data file {path}: line 3 is not UTF-8 (byte 0xe9 at byte offset {offset}); "
                             "re-save it as UTF-8")


def test_invalid_utf8_after_a_bom_counts_the_bom_in_the_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(BOM + b'{"question": "' + LATIN1 + b'"}\n')
    assert "line 1 is not UTF-8 (byte 0xe9 at byte offset 20)" in refused(path)


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", '{"question": "café", "answer": "1"}\n{"question": "q2", "answer": "2"}\n'),
    ("d.json", '{"question": "café", "answer": "1"}\n{"question": "q2", "answer": "2"}\n'),
    ("d.csv", "question,answer\ncafé,1\nq2,2\n"),
    ("q.csv", '"question","answer"\r\n"café","1"\r\n"q2","2"\r\n'),
    ("d.tsv", "question\tanswer\ncafé\t1\nq2\t2\n"),
])
@pytest.mark.parametrize("bom", [b"", BOM], ids=["plain", "bom"])
def test_utf8_with_or_without_a_bom_reads_with_clean_column_names(tmp_path, name, content, bom):
    path = tmp_path / name
    path.write_bytes(bom + content.encode())
    table = read_table(str(path))
    assert list(table.column_names) == ["question", "answer"]
    assert table[0]["question"] == "café" and len(table) == 2


def test_csv_and_tsv_numbers_keep_datasets_type_inference(tmp_path):
    """A site's record-hash split hashes its records as read: a CSV's numeric labels stay numbers."""
    path = tmp_path / "d.tsv"
    path.write_bytes(BOM + b"text\tlabel\nq\t1\nr\t0\n")
    assert read_table(str(path))["label"] == [1, 0]


@pytest.mark.parametrize("name, content, message", [
    ("h.csv", b"question,answer\n", "holds no records, only its header line (question, answer); "
                                    "add one record per line below it"),
    ("h.tsv", BOM + b"question\tanswer\r\n\r\n", "holds no records, only its header line (question, answer); "
                                                 "add one record per line below it"),
    ("e.csv", b"", "holds no records; it needs a header line with the column names, then one record per line"),
    ("e.tsv", BOM + b"\n \n", "holds no records; it needs a header line with the column names, then one record "
                              "per line"),
    ("e.jsonl", b"", "holds no records; it needs one JSON object per line"),
    ("b.jsonl", BOM + b"\n\n", "holds no records; it needs one JSON object per line"),
    ("e.parquet", b"", "holds no records; it needs at least one row"),
])
def test_an_empty_or_header_only_file_says_what_is_missing(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert refused(path) == f"data file {path}: {message}"


def test_a_csv_parser_error_is_its_cause_in_one_line(tmp_path, capfd):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\nq,a,b,c\n")
    assert refused(path) == (f"data file {path}: cannot be read as CSV: "
                             "Error tokenizing data. C error: Expected 2 fields in line 3, saw 4")
    assert "Failed to read file" not in capfd.readouterr().err


def test_a_field_past_the_csv_modules_limit_still_reads_and_is_checked(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq," + "x" * 200_000 + "\n")
    assert len(read_table(str(path))["answer"][0]) == 200_000
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"question,answer\nq," + b"x" * 200_000 + b"\n" + LATIN1 + b",a\n")
    assert "line 3 is not UTF-8" in refused(bad)


def spec_for(path, **overrides):
    return DataSpec.from_config(resolve({"data.path": str(path), **overrides}))


def test_a_missing_column_names_the_columns_and_the_fix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,reply\nq,a\n")
    with pytest.raises(UserError) as err:
        check_fields(read_table(str(path)), spec_for(path))
    assert str(err.value) == (f"data file {path}: field 'answer' (data.response-field) is missing; columns are "
                              "question, reply: set data.response-field to one of them, or rename the column in "
                              "the file")


def test_a_csv_with_another_separator_is_named_as_such(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question;answer\nq;a\n")
    with pytest.raises(UserError) as err:
        check_fields(read_table(str(path)), spec_for(path))
    assert str(err.value).endswith("columns are question;answer: the header reads as one column, so the file "
                                   "looks separated by ';'; save it comma-separated (.csv) or tab-separated (.tsv)")
