"""deploy/HOSPITAL.md's walk-through, run as written: its command blocks, read from the guide itself.

A guide that is only read goes stale (it once showed train losses that DP no longer sends,
and a ledger file name that had changed). So this test takes the commands of each
"**Terminal N ...**" block of the "Try it" section out of the Markdown and runs them in a
bash per terminal, in the guide's order, with only these changes, each said in the guide or
forced by a test machine:

- the guide's own tiny-model path ("write model-dir = "tiny" ..., skip the conversion line,
  add model.name='tiny' model.max-length=64 to the --run-config of flwr run");
- HOME is a temporary directory, and the ports 8000 / 9094 / 9095 are free ones;
- the commands run in a copy of the repository's tracked files (a fresh clone: the run
  directory the SuperLink writes lands there) whose .venv is this interpreter's;
- a line that ends in `&` also records the PID of its job (its own process group), which
  the test stops instead of the guide's `kill %1 %2`.

``FEDSLM_GUIDE_AS_WRITTEN=1`` drops the tiny path: SmolLM2, converted once, as the guide's
sample output was recorded (about 15 minutes on 2 cores; the commands and output are in the
test's guide.log).

Then what the guide says came out must come out: the shape of every line of the sample
output it shows (numbers, digests and paths aside) is in the real output, the run's last line
is its done line, and the budgets it states hold.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pytest
from servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "deploy" / "HOSPITAL.md"
SECTION = "## Try it"
CONVERSION = "resolve_model_dir('smollm2')"  # the line the tiny path skips
TINY_RUN_CONFIG = "model.name='tiny' model.max-length=64"  # what it adds to `flwr run`


def guide_section(text: str) -> list[str]:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else None].splitlines()


def blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Indented blocks in order, each with the first line of the paragraph before it ('' right after a block)."""
    out, lead, current, after_blank = [], "", None, True
    for line in [*lines, ""]:
        if line.startswith("    ") and (current is not None or after_blank):
            current = current if current is not None else (lead, [])
            current[1].append(line[4:])
        elif not line.strip():
            if current is not None:
                out.append(current)
                current, lead = None, ""
        elif after_blank:
            lead = line.strip()  # a paragraph starts
        after_blank = not line.strip()
    return out


def terminal_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(terminal, heading, commands) of each block right after a "**Terminal N" paragraph."""
    found = []
    for lead, body in blocks(guide_section(text)):
        match = re.match(r"\*\*Terminal (\d)[^*]*\*\*", lead)
        if match:
            found.append((int(match.group(1)), match.group(0).strip("*"), body))
    return found


def sample_outputs(text: str) -> dict[str, list[str]]:
    """The guide's sample output: the block after "What it printed" and the one after the budget commands."""
    printed, budget = [], []
    all_blocks = blocks(guide_section(text))
    for i, (lead, body) in enumerate(all_blocks):
        if lead.startswith("What it printed"):
            printed = body
        if any(line.startswith("fedslm budget") for line in body) and i + 1 < len(all_blocks):
            budget = all_blocks[i + 1][1]
    return {"flwr run": printed, "fedslm budget": budget}


def shape(line: str) -> str:
    """A line with its paths and numbers blanked: what a run on other records and another machine keeps."""
    line = re.sub(r"/\S+", "<path>", line.strip())
    line = re.sub(r"\b[0-9a-f]{16,64}\b", "<digest>", line)
    line = re.sub(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", line)
    return re.sub(r"\s+", " ", line)


def follows(expected: list[str], actual: list[str]) -> list[str]:
    """The expected lines whose shape ``actual`` lacks (as many times as expected; sites reply in any order)."""
    have, missing = Counter(shape(line) for line in actual), []
    for line in expected:
        if have[shape(line)] > 0:
            have[shape(line)] -= 1
        else:
            missing.append(line)
    return missing


def tiny_path(commands: list[str]) -> list[str]:
    """The guide's own laptop path: the tiny base in node configs and run config, no conversion."""
    out = []
    for line in commands:
        if CONVERSION in line:
            continue
        line = line.replace('model-dir = "smollm2"', 'model-dir = "tiny"')
        if line.startswith("flwr run "):
            line = re.sub(r'--run-config "([^"]*)"',
                          lambda m: f'--run-config "{m.group(1)} {TINY_RUN_CONFIG}"', line)
        out.append(line)
    return out


def test_the_guide_has_the_blocks_this_test_runs():
    """Fast: the walk-through still has its six terminal blocks, its sample output and its tiny path."""
    text = GUIDE.read_text()
    found = terminal_blocks(text)
    assert [t for t, _, _ in found] == [1, 2, 1, 2, 1, 2], [h for _, h, _ in found]
    commands = [line for _, _, body in found for line in body]
    assert sum(CONVERSION in line for line in commands) == 1
    assert sum(line.count('model-dir = "smollm2"') for line in commands) == 2
    assert sum(line.startswith("flwr run ") and "--run-config" in line for line in commands) == 1
    tiny = tiny_path(commands)
    assert sum(line.count('model-dir = "tiny"') for line in tiny) == 2
    assert all(output for output in sample_outputs(text).values())
    prose = " ".join(text.split())
    assert "model-dir = \"tiny\"" in prose and TINY_RUN_CONFIG in prose  # the path it states


def repository_copy(dest: Path) -> Path:
    """The tracked files, as a fresh clone has them, with this interpreter's virtualenv as .venv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


class Terminals:
    """One bash per guide terminal: its exports carry over, its background jobs are recorded and stopped."""

    def __init__(self, cwd: Path, env: dict, log: Path):
        self.cwd, self.env, self.log, self.pids = cwd, env, log, log.parent / "pids"
        self.exports: dict[int, list[str]] = {}

    def run(self, terminal: int, commands: list[str], timeout: float) -> str:
        lines = []
        for line in commands:
            lines.append(re.sub(r"\s&$", f" & echo $! >> {self.pids}", line))
        script = "\n".join(["set -em", *self.exports.get(terminal, []), *lines])
        self.exports.setdefault(terminal, []).extend(
            line for line in commands if line.startswith(("export ", "source ")))
        proc = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        with self.log.open("a") as out:
            out.write(f"--- terminal {terminal}\n{script}\n--- exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        assert proc.returncode == 0, f"terminal {terminal} failed:\n{script}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def stop(self) -> None:
        """Each background job's process group, by the PID the guide's `&` line recorded (SIGTERM, then SIGKILL)."""
        pids = [int(p) for p in self.pids.read_text().split()] if self.pids.exists() else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            if sig == signal.SIGTERM:
                deadline = 20
                while deadline > 0 and any(alive(pid) for pid in pids):
                    subprocess.run(["sleep", "0.5"])
                    deadline -= 0.5


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.integration
def test_the_hospital_guide_runs_as_written_on_loopback(tmp_path, model_cache):
    """Certificates, SuperLink, two SuperNodes with allow-lists, registration, `flwr run`, `fedslm budget`."""
    from slm.base import resolve_model_dir

    resolve_model_dir("tiny")  # the cache every ClientApp process reads (the guide's conversion line, for tiny)
    home, repo = tmp_path / "home", repository_copy(tmp_path / "fedslm")
    home.mkdir()
    superlink, runtime_a, runtime_b = free_port(), free_port(), free_port()
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FEDSLM_CACHE": model_cache,
           "FEDSLM_PORT": str(superlink)}
    ports = {"127.0.0.1:8000": f"127.0.0.1:{superlink}", "PORT=9094": f"PORT={runtime_a}",
             "PORT=9095": f"PORT={runtime_b}"}
    text = GUIDE.read_text()
    as_written = os.environ.get("FEDSLM_GUIDE_AS_WRITTEN") == "1"
    steps = [(terminal, heading, [replace_all(line, ports) for line in body])
             for terminal, heading, body in terminal_blocks(text)]
    steps = steps if as_written else [(terminal, heading, tiny_path(body)) for terminal, heading, body in steps]
    shells = Terminals(repo, env, tmp_path / "guide.log")
    outputs = {}
    try:
        for terminal, heading, commands in steps:
            output = shells.run(terminal, commands, timeout=3600 if as_written else 900)
            if heading.startswith("Terminal 1 (coordinator)"):
                wait_for_port(superlink, timeout=120)
            if "start both SuperNodes" in heading:
                wait_for_port(runtime_a, timeout=120)
                wait_for_port(runtime_b, timeout=120)
            for command in ("flwr run", "fedslm budget"):
                if any(line.startswith(command) for line in commands):
                    outputs[command] = output.splitlines()
    finally:
        shells.stop()

    run_lines = [line for line in outputs["flwr run"] if line.startswith("[fedslm]")]
    assert run_lines[-1] == "[fedslm] done: 2 of 2 rounds trained", "\n".join(run_lines)
    assert (repo / "runs" / "hospital-demo" / "metrics.jsonl").is_file()
    for command, sample in sample_outputs(text).items():
        missing = follows(sample, outputs[command])
        assert not missing, f"the guide shows lines `{command}` no longer prints:\n" + "\n".join(missing) + \
            "\n--- it printed:\n" + "\n".join(outputs[command])
    spent = [float(m.group(1)) for line in outputs["fedslm budget"]
             for m in [re.match(r"spent eps ([\d.]+) .*budget (\d+)", line)] if m]
    assert len(spent) == 2 and spent[0] <= 8.0 and spent[1] <= 4.0 and spent[1] < spent[0], spent


def replace_all(line: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        line = line.replace(old, new)
    return line
