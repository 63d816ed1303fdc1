"""The operator's confirmation that a site's changed records are its data now (``fedslm confirm-data``).

The ledger refuses to train when the site's training records differ from the version it
last accepted (records appended, removed or edited; or a changed held-out setting). Only
the site's operator, at the site, on its own node config, confirms the new version. The
spend continues across versions: the ledger composes every release over any subset of the
site's records, so a new version never brings a fresh budget.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from client.data import load_local_data
from client.site import SitePolicy
from client.units import training_units
from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from privacy.mechanism.ledger import Ledger, fingerprint
from privacy.mechanism.ledger_file import LedgerError
from privacy.mechanism.policy import default_delta


def confirm_data(node_config_path: Path, request_overrides: dict | None = None) -> str:
    """Accept the site's current training records in its ledger; returns what was done, in one line."""
    try:
        node_config = tomllib.loads(Path(node_config_path).read_text())
    except OSError as err:
        raise UserError(f"node config {node_config_path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"node config {node_config_path}: not valid TOML ({err})") from None
    policy = SitePolicy.from_node_config(node_config, where=f"node config {node_config_path}")
    request = RunConfig.parse(resolve(request_overrides or {}))
    local = replace(load_local_data(policy.data_spec(request), 0, 1), name=policy.name)
    units = training_units(policy.unit, local.train)
    records = len(local.train) if units is None else len(units)
    what = "training records" if units is None else f"{policy.unit.word}s ({len(local.train)} training records)"
    try:
        ledger = Ledger.open(policy.ledger_dir, fingerprint=fingerprint(local.train), records=records,
                             delta=policy.delta or default_delta(records), unit=policy.unit.ledger_label)
        before = ledger.data[-1].records if ledger.data else None
        if not ledger.data_changed:
            return f"site {policy.name}: the ledger already holds these {records} {what}; nothing to confirm"
        ledger.confirm_data()
    except LedgerError as err:  # the operator's command speaks one error type, naming the ledger
        raise UserError(str(err)) from None
    return (f"site {policy.name}: confirmed {records} {what} (was {before}); spent so far "
            f"{ledger.spent():.3f} of {policy.max_epsilon:g} at delta {ledger.delta:g}, unchanged")
