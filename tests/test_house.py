"""The house drawn from its imports: every room imports only the rooms below it, never one above.

README's architecture section states the order; this test reads every ``import`` of the
project's own modules (module level and inside functions) and fails on an arrow that runs
back up, naming the file. A back arrow is how the report once re-derived what a run did
with today's server code.
"""

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each room and the rooms it may import (besides itself). Listed bottom up.
MAY_IMPORT = {
    "privacy/mechanism": set(),  # what a reviewer must trust reads standalone: it imports nothing of the project's
    # the vocabulary: config keys, UserError, JSON files (written as the ledger is: privacy.mechanism.ledger_file)
    "fedslm/common": {"privacy/mechanism"},
    "slm": {"fedslm/common", "privacy/mechanism"},
    "privacy/audit": {"privacy/mechanism", "fedslm/common", "slm"},
    "privacy/report": {"privacy/audit", "privacy/mechanism", "fedslm/common", "slm"},
    "client": {"privacy/mechanism", "fedslm/common", "slm"},
    "server": {"privacy/report", "privacy/mechanism", "fedslm/common", "slm"},
    "deploy": {"client", "fedslm/common", "slm"},
    "simulation": {"server", "client", "privacy/report", "privacy/audit", "privacy/mechanism", "fedslm/common", "slm"},
    "fedslm/cli": {"simulation", "server", "client", "privacy/report", "privacy/audit", "privacy/mechanism",
                   "fedslm/common", "slm"},  # the face: what `fedslm --help` lists
    "benchmarks": {"fedslm/cli", "simulation", "server", "client", "privacy/report", "privacy/audit",
                   "privacy/mechanism", "fedslm/common", "slm"},
}
TOPS = {room.split("/")[0] for room in MAY_IMPORT}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in TOPS:
        return None
    if parts[0] in ("privacy", "fedslm"):  # rooms on two floors: a room per sub-package
        return "/".join(parts[:2]) if len(parts) > 1 else None
    return parts[0]


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_imports_flow_one_way():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    back, seen = [], set()
    for name in files:
        room = room_of(name.removesuffix(".py").replace("/", "."))
        if room is None or room not in MAY_IMPORT:
            continue
        seen.add(room)
        for module in imports(ROOT / name):
            target = room_of(module)
            if target and target != room and target not in MAY_IMPORT[room]:
                back.append(f"{name} imports {module} ({room} -> {target})")
    assert seen == set(MAY_IMPORT), f"rooms without files: {set(MAY_IMPORT) - seen}"
    assert not back, "imports that run back up:\n" + "\n".join(back)
