"""A finished (or stopped, or crashed) run directory, read for reporting.

The report must be reproducible from the files alone, and a reader who gets an error
must know which file to look at: every missing or unreadable file is one
``UserError`` naming it. What is required depends on how far the run got:

- ``config.json`` and ``metrics.jsonl`` (with at least round 0): always;
- ``privacy/ledger.json`` (the server's view of the clients' privacy records): once a
  round after round 0 is in metrics.jsonl, since the server writes it every round;
- ``events.jsonl``: optional (runs written before it existed, or a crashed run); read
  when present;
- ``initial_adapter.json``: present when the run did not start from the shared seed's adapter
  (server.initial-adapter: where it came from, and a warm start's public file);
- the clients' own ledgers: optional (a deployment's server never sees them); read when
  a simulation left them on this machine, under ``<run>/ledgers/<client>/`` or
  ``dp.ledger-dir/<client>/``.

Old configurations lack keys added later; the current defaults fill them in, and
``recorded`` says which keys the run really had (a default for a setting that did not
exist yet may not describe what the run did). The report reads the settings as typed specs
(``specs``, fedslm.common.vocabulary): config.json already holds resolved values (the
aggregation used, the learning rate), so nothing is resolved again with today's rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import iter_json_lines, read_json
from fedslm.common.vocabulary import RunConfig, defaults
from privacy.mechanism.ledger import LEDGER_FILE, Ledger
from privacy.mechanism.ledger_file import LedgerError


def aggregated_update(row: dict) -> bool:
    """Whether a round's metrics row aggregated at least one client's update (round 0, a skipped
    or interrupted round, and a user-level DP round over an empty cohort did not: nothing was trained)."""
    if row.get("skipped") or row.get("interrupted"):
        return False
    return bool(row.get("participants")) or row.get("cohort", 0) > 0


@dataclass(frozen=True)
class RunFiles:
    path: Path
    config: dict  # config.json over the current defaults (also in report.json, as the run's settings)
    specs: RunConfig  # the same, typed
    recorded: frozenset[str]  # the keys config.json itself holds (a key added later was not a setting then)
    rows: list[dict]  # metrics.jsonl, one per round, round 0 first
    view: dict  # privacy/ledger.json: {"clients": {name: [record...]}, "user_level": [...], "exhausted": [...]}
    events: list[dict]  # events.jsonl
    ledgers: dict[str, Ledger] = field(default_factory=dict)  # client name -> its own ledger, when found
    start: dict | None = None  # initial_adapter.json: the run started from this adapter, not the seed's

    @property
    def run_id(self) -> str:
        return self.specs.run.id or self.path.name

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunFiles":
        path = Path(run_dir).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"run directory {path}: not found")
        stored = _json(path / "config.json", dict)
        rows = _jsonl(path / "metrics.jsonl", required=True)
        if not rows or rows[0].get("round") != 0:
            raise UserError(f"{path / 'metrics.jsonl'}: no round 0 row (the run stopped before its first evaluation)")
        for number, row in enumerate(rows, 1):
            if not isinstance(row.get("round"), int):
                raise UserError(f"{path / 'metrics.jsonl'}: line {number} has no integer 'round'")
        view_path = path / "privacy" / "ledger.json"
        if view_path.exists() or len(rows) > 1:
            view = _json(view_path, dict)
            if not isinstance(view.get("clients"), dict):
                raise UserError(f"{view_path}: missing field 'clients'")
        else:
            view = {"clients": {}}
        config = {**defaults(), **stored}
        files = cls(path=path, config=config, specs=RunConfig.parse(config), recorded=frozenset(stored), rows=rows,
                    view=view,
                    events=_jsonl(path / "events.jsonl", required=False),
                    start=_json(path / "initial_adapter.json", dict) if (path / "initial_adapter.json").exists()
                    else None)
        names = set(view["clients"]) | {n for r in rows for n in r.get("eval_clients", {})}
        files.ledgers.update(_client_ledgers(files, sorted(names)))
        return files


def _json(path: Path, kind: type):
    data = read_json(path)
    if not isinstance(data, kind):
        raise UserError(f"{path}: expected a JSON {kind.__name__}")
    return data


def _jsonl(path: Path, *, required: bool) -> list[dict]:
    if not path.is_file():
        if required:
            raise UserError(f"{path}: missing")
        return []
    return list(iter_json_lines(path))


def _client_ledgers(files: RunFiles, names: list[str]) -> dict[str, Ledger]:
    """Each client's ledger holding this run's entries (one per site: <ledger root>/<name>/ledger.json)."""
    roots = [files.path / "ledgers"]
    if files.specs.dp.ledger_dir:
        roots.append(Path(files.specs.dp.ledger_dir).expanduser())
    found = {}
    for name in names:
        for root in roots:
            candidate = root / name / LEDGER_FILE
            if candidate.is_file():
                try:
                    ledger = Ledger.load(candidate)
                except LedgerError as err:  # the report's one error type, naming the file
                    raise UserError(str(err)) from None
                if any(e.run_id == files.run_id for e in ledger.entries):
                    found[name] = ledger
    return found
