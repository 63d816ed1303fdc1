"""The run directory: everything a user gets from a run, written as the run goes.

    <run>/config.json          resolved configuration
    <run>/metrics.jsonl        one JSON object per round (round 0 = the initial adapter)
    <run>/privacy/ledger.json  the server's view of every client's privacy records
    <run>/adapters/round-<k>/  the global adapter after round k, in PEFT format
    <run>/ledgers/<client>/    (simulation) each client's own ledger
    <run>/checkpoint.safetensors  the server state after the last completed round (under user-level
                               DP also after a round's noise draw, before its release)
    <run>/events.jsonl         run-level events: finished, stopped early, resumed
    <run>/initial_adapter.json where the starting adapter came from, when not the shared seed
                               (server.initial-adapter; a `fedslm warm-start` records its public file)

A run directory is written by one run: a new run whose directory already holds one (a
re-used ``run.id``) writes ``<run.id>-2`` (``-3``, ...) instead, and the old one is left as
it was; only ``run.resume`` continues a run in its own directory.

JSON files are replaced atomically; metrics.jsonl is appended line by line and fsynced,
so a crash loses at most the line being written. Every file is strict JSON: a non-finite
number (an eval loss no site computed) is written as null, never as a bare NaN.

The run directory (metrics.jsonl, privacy/ledger.json, checkpoint.safetensors) is secret
material: anyone who reads it learns who took part, against whom the user-level
amplification does not hold (the privacy view names every site's reported records per
round, and so does the report built from it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fedslm.common.jsonfiles import strict_line, write_json_atomic

# What a run leaves in its directory; any one of them means the directory holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "events.jsonl", "privacy", "adapters", "ledgers")


def run_files(path: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """The names of ``names`` that ``path`` holds: none, no run is there."""
    return [name for name in names if (path / name).exists()]


def unused(path: Path) -> Path:
    """``path``, or the first of ``path-2``, ``path-3``, ... that holds no run."""
    candidate, k = path, 1
    while run_files(candidate) or candidate.is_file():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, root: str, run_id: str, fresh: bool = False) -> "RunDir":
        """The run's directory; ``fresh``: never one that already holds a run (see ``unused``)."""
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S", time.localtime())
        path = Path(root).expanduser().resolve() / run_id
        if fresh:
            path = unused(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.path / "config.json", config, strict=True)

    def write_initial_adapter(self, record: dict) -> None:
        write_json_atomic(self.path / "initial_adapter.json", record, strict=True)

    def append_metrics(self, row: dict) -> None:
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(strict_line(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def log_event(self, event: dict) -> None:
        """Run-level events (finished, stopped, resumed) in events.jsonl."""
        with (self.path / "events.jsonl").open("a") as handle:
            handle.write(strict_line({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def keep_metrics_through(self, last_round: int) -> None:
        """On resume: drop rows of rounds after the checkpoint, so no round appears twice."""
        path = self.path / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["round"] <= last_round]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(row + "\n" for row in rows))
            os.replace(tmp, path)

    def write_privacy_view(self, view: dict) -> None:
        write_json_atomic(self.path / "privacy" / "ledger.json", view, strict=True)

    def adapter_dir(self, server_round: int) -> Path:
        return self.path / "adapters" / f"round-{server_round}"
