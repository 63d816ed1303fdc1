"""`fedslm --help` says who runs what: every command is in an audience's list, and every listed name is a command."""

import subprocess
import sys

from fedslm.cli.main import AUDIENCES, build_parser


def test_every_command_has_an_audience_and_every_audience_lists_commands():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    listed = {name for names in AUDIENCES.values() for name in names}
    assert commands - listed == set(), "commands that `fedslm --help` lists for nobody"
    assert listed - commands == set(), "names `fedslm --help` lists that are no command"


def test_python_m_fedslm_prints_the_audiences():
    done = subprocess.run([sys.executable, "-m", "fedslm", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "a site operator: budget, confirm-data, report, chat" in done.stdout
    assert "deploy/README.md" in done.stdout
