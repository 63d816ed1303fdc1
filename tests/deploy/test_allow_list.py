"""deploy.allow_list and deploy.approve: the site's list of approved app bundles, and how a hash gets on it."""

import hashlib
import subprocess
import sys

import pytest
from harness import ROOT
from servers import BIN

from deploy.allow_list import AllowListError, entry, parse, read
from deploy.approve import add, bundle, fab_hash, main

A, B = "a" * 64, "0123456789abcdef" * 4


def test_lines_comments_and_blanks():
    text = f"# approved by the DPO\n\n{A}  fedslm/fedslm 0.1.0 from /opt/fedslm\n  {B}\n{A}  again\n"
    assert parse(text, "f") == {A: "fedslm/fedslm 0.1.0 from /opt/fedslm", B: ""}


@pytest.mark.parametrize("line", ["A" * 64, "a" * 63, f"sha256:{A}", f"{A}x comment", "approved"])
def test_a_malformed_line_is_an_error_naming_file_and_line(line):
    with pytest.raises(AllowListError, match=r"allow-list /etc/approved.txt: line 2 does not start with a sha256"):
        parse(f"{A}\n{line}\n", "/etc/approved.txt")


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(AllowListError, match=f"allow-list {tmp_path / 'nope.txt'}: No such file"):
        read(tmp_path / "nope.txt")


def test_entry_is_one_line_with_its_comment():
    assert entry(A, "fedslm 0.1.0\nfrom x") == f"{A}  fedslm 0.1.0 from x\n"
    with pytest.raises(AllowListError):
        entry("not-a-hash", "")


def test_add_creates_appends_and_never_duplicates(tmp_path):
    path = tmp_path / "site" / "approved.txt"
    assert add(path, A, "first") and add(path, B, "second") and not add(path, A, "first again")
    assert path.read_text() == f"{A}  first\n{B}  second\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    path.chmod(0o640)
    path.write_text("# kept\n" + path.read_text().rstrip("\n"))  # hand-edited, no final newline
    assert add(path, "c" * 64, "third")
    assert path.read_text() == f"# kept\n{A}  first\n{B}  second\n{'c' * 64}  third\n"
    assert path.stat().st_mode & 0o777 == 0o640  # the site's own permissions stay
    assert [p.name for p in path.parent.iterdir()] == ["approved.txt"]  # no temporary file left


def test_add_refuses_to_append_to_a_malformed_list(tmp_path):
    path = tmp_path / "approved.txt"
    path.write_text("not a hash\n")
    with pytest.raises(AllowListError, match="line 1"):
        add(path, A, "x")
    assert path.read_text() == "not a hash\n"


def test_the_hash_is_flowers_own_build_of_the_app(tiny_app, tmp_path):
    """`flwr build` writes the bundle `flwr run` would send: deploy.approve hashes the same bytes."""
    out = tmp_path / "out"
    out.mkdir()
    built = subprocess.run([str(BIN / "flwr"), "build", "--app", str(tiny_app)], cwd=out, capture_output=True,
                           text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = out.glob("*.fab")
    digest = fab_hash(bundle(tiny_app))
    assert digest == hashlib.sha256(fab.read_bytes()).hexdigest() and fab.name.endswith(f".{digest[:8]}.fab")
    assert fab_hash(bundle(tiny_app)) == digest  # deterministic
    (tiny_app / "tinyclient.py").write_text((tiny_app / "tinyclient.py").read_text() + "# changed\n")
    assert fab_hash(bundle(tiny_app)) != digest  # any change to a bundled file is another app


def test_cli_prints_the_hash_and_adds_it_once(tiny_app, tmp_path, capsys):
    path = tmp_path / "approved.txt"
    assert main([str(tiny_app), "--allow-list", str(path)]) == 0
    out, err = capsys.readouterr()
    digest = out.strip()
    assert digest == fab_hash(bundle(tiny_app))
    assert f"allow-list {path}: added (fedslm-test/tinyapp 1.0.0 from {tiny_app} approved " in err
    assert main([str(tiny_app), "--allow-list", str(path)]) == 0
    assert capsys.readouterr().err.strip() == f"allow-list {path}: already approved"
    (line,) = path.read_text().splitlines()
    assert line.startswith(f"{digest}  fedslm-test/tinyapp 1.0.0 from {tiny_app} approved ")
    assert main([str(tiny_app)]) == 0 and capsys.readouterr().out.strip() == digest  # without a list: hash only


@pytest.mark.parametrize("setup, message", [
    (lambda app: None, "app directory {app}: not a directory"),
    (lambda app: app.mkdir(), "app directory {app}: Flower cannot bundle it (pyproject.toml not found"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, setup, message):
    app = tmp_path / "app"
    setup(app)
    assert main([str(app)]) == 2
    assert capsys.readouterr().err.startswith(f"deploy.approve: error: {message.format(app=app)}")


def test_check_command_counts_the_approved_bundles(tmp_path):
    path = tmp_path / "approved.txt"
    path.write_text(f"{A}  x\n")
    check = [sys.executable, "-m", "deploy.allow_list", str(path)]
    proc = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"allow-list {path}: 1 approved app bundle(s)"
    path.write_text("oops\n")
    proc = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"deploy.allow_list: error: allow-list {path}: line 1")
