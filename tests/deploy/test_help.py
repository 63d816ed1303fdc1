"""Every deploy module answers --help with its usage (issue 27: `deploy.node_config --help` read a file '--help')."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["node_config", "allow_list", "approve", "certs", "app_guard"])
def test_every_deploy_module_answers_help(module):
    done = subprocess.run([sys.executable, "-m", f"deploy.{module}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-500:]
    assert "No such file" not in done.stdout + done.stderr
    if module == "node_config":
        assert "privacy-unit-field" in done.stdout and "max-epsilon (required)" in done.stdout
