"""What every benchmark needs: a process tree's peak memory, a timed federation run, a table.

A Flower simulation is several processes (this driver, Ray's GCS and raylet, the worker
that runs the ClientApps), so "peak memory" is sampled over the whole process tree of
the run, not read from this process's own rusage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.root, self.every = psutil.Process(pid), every
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        sizes = []
        for proc in processes:
            try:
                sizes.append(proc.memory_info().rss)
            except psutil.Error:
                continue
        if sizes:
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)


@dataclass(frozen=True)
class RunResult:
    out: Path
    wall: float
    peak_rss: int  # bytes, summed over the process tree
    peak_rss_process: int  # bytes, the largest single process
    rows: list[dict]  # metrics.jsonl


def simulate(scenario: str, out: Path, clients: int, settings: dict, rounds: int, model: str = "") -> RunResult:
    """``fedslm simulate`` as a child process, timed, with its process tree's memory sampled."""
    command = [sys.executable, "-m", "fedslm", "simulate", "--scenario", scenario, "--clients", str(clients),
               "--rounds", str(rounds), "--out", str(out)]
    command += ["--model", model] if model else []
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid) as memory:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fedslm simulate failed ({proc.returncode}):\n{log[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunResult(out, wall, memory.peak_total, memory.peak_single, rows)


def table(head: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (also valid Markdown), for the console and BENCHMARKS.md."""
    cells = [[str(c) for c in head]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def mib(n: int) -> float:
    return n / 2**20
