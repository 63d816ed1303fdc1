"""Bad input: one clear line naming the file or field, non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest


def fedslm(*args):
    return subprocess.run([sys.executable, "-m", "fedslm", *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedslm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]


def test_unknown_scenario():
    assert_one_line_error(fedslm("simulate", "--scenario", "moon"), "unknown scenario 'moon'", "tiny, hospital")


def test_unknown_config_key():
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", "dp.epsilonn=3"),
                          "unknown config key 'dp.epsilonn'")


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", f"data.path={missing}"),
                          str(missing), "not found")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + "{oops\n")
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", f"data.path={path}"),
                          "line 2 is not valid JSON")


def test_missing_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(20)))
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", f"data.path={path}"),
                          "field 'question' (data.prompt-field) is missing")


def test_batch_larger_than_client_data():
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", "train.batch-size=500"),
                          "train.batch-size", "larger than client 'client-0'")


@pytest.mark.parametrize("args, words", [
    (["--set", "data.partition=natural", "--clients", "3"], ["natural partition by 'source' has 4 groups"]),
    (["--set", "model.name=/no/such/model"], ["model '/no/such/model'"]),
])
def test_inconsistent_setup(args, words):
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", *args), *words)


@pytest.mark.parametrize("setting, words", [
    ("dp.delta=2", ["config key 'dp.delta': must be in (0, 0.001] or 0, got 2.0"]),
    ("dp.max-epsilon=-1", ["config key 'dp.max-epsilon': must be > 0"]),
])
def test_out_of_range_value(setting, words):
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", setting), *words)


def test_numeric_labels_need_verbalizers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,text\n" + "".join(f"{i % 2},sentence {i}\n" for i in range(20)))
    assert_one_line_error(fedslm("simulate", "--scenario", "tiny", "--set", f"data.path={path}",
                                 "--set", "data.task=label"), "labels 0, 1 in data file", "0=negative,1=positive")


# A user's bad file is reported before torch is imported (importing it takes seconds): the
# command runs in a fresh interpreter that lists the heavy modules loaded when the error came.
BEFORE_HEAVY = """
import sys
from fedslm.cli.main import main
code = main(sys.argv[1:])
print(sorted(m for m in ("torch", "peft", "opacus") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("command", ["simulate", "data"])
@pytest.mark.parametrize("content", ["question,answer\n", "question,answer\ncaf\xe9,ok\n"], ids=["header-only", "latin-1"])
def test_a_bad_file_is_reported_before_torch_is_imported(tmp_path, command, content):
    path = tmp_path / "records.csv"
    path.write_bytes(content.encode("latin-1"))
    args = ["simulate", "--scenario", "tiny", "--set", f"data.path={path}", "--out", str(tmp_path / "run")] \
        if command == "simulate" else ["data", str(path)]
    proc = subprocess.run([sys.executable, "-c", BEFORE_HEAVY, *args], capture_output=True, text=True, timeout=120)
    error, loaded = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and error.startswith("fedslm: error: data file") and str(path) in error, proc.stderr
    assert loaded == "[]", f"imported before the file was checked: {loaded}"
    assert not (tmp_path / "run").exists()
