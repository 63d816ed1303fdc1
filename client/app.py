"""The ClientApp: local DP-LoRA training and evaluation on data that never leaves the client.

A train message carries the global adapter and the round; the reply carries the new
adapter, the train loss, the example count and a privacy record. The client's own
policy (node config in a deployment, run config in a simulation) decides the noise: the
server's requested sigma is a floor, never a ceiling (privacy.mechanism.policy).

Node config keys honoured in deployments: ``data-path``, ``ledger-dir``, ``max-epsilon``,
``delta``, ``model-dir``, ``shipped-dir`` and ``name`` (how the site appears in the coordinator's
metrics, privacy view and its own ledger directory); in simulations Flower sets only
``partition-id`` and ``num-partitions``.

A deployment (a node config with ``data-path``) also pins what the coordinator must not be
able to switch off from its run config: DP stays on and the noise comes from OS entropy
(``DEPLOYMENT_PINS``). Only the site's own node config could change them, and it has no key
for that.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import DataSpec, load_local_data
from client.shipment import receive_and_evaluate
from client.train import sample_rate, train_adapter
from privacy.mechanism.ledger import Entry, Ledger, fingerprint
from privacy.mechanism.policy import decide, default_delta
from slm.config import from_run_config
from slm.errors import UserError
from slm.evaluate import evaluate
from slm.lora import (
    LoraSpec,
    a_factor_digest,
    adapter_state,
    attach,
    from_arrays,
    frozen_a_factors,
    sent_tensors,
    set_adapter_state,
    to_arrays,
)
from slm.quiet import quiet_libraries
from slm.tasks import Task

NODE_KEYS = {"data-path": "data.path", "ledger-dir": "dp.ledger-dir", "max-epsilon": "dp.max-epsilon",
             "delta": "dp.delta", "model-dir": "model.name", "shipped-dir": "ship.dir"}
SITE_NAME_KEY = "name"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a directory name under the ledger dir
DEPLOYMENT_PINS = {"dp.enabled": True, "dp.noise-seed": -1}

quiet_libraries()
app = ClientApp()


def is_deployment(context: Context) -> bool:
    return "data-path" in context.node_config


def local_config(context: Context) -> dict:
    """Run config with the node's own settings on top: local policy wins."""
    overrides = dict(context.run_config)
    if is_deployment(context):
        overrides.update(DEPLOYMENT_PINS)
    for node_key, run_key in NODE_KEYS.items():
        if node_key in context.node_config:
            overrides[run_key] = context.node_config[node_key]
    return from_run_config(overrides)


def _local_data(config: dict, context: Context):
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    if is_deployment(context):  # the whole file is this client's
        partition_id, num_partitions = 0, 1
    local = load_local_data(DataSpec.from_config(config), partition_id, num_partitions)
    if SITE_NAME_KEY in context.node_config:
        local = replace(local, name=site_name(context.node_config[SITE_NAME_KEY]))
    return local


def site_name(value) -> str:
    """A node config's ``name``, checked: it becomes a directory under the ledger dir."""
    if not isinstance(value, str) or not SITE_NAME.fullmatch(value):
        raise UserError(f"node config key '{SITE_NAME_KEY}': {value!r} is not a site name "
                        "(letters, digits, '.', '_', '-'; at most 64; not starting with '.', '_' or '-')")
    return value


def _setup(msg: Message, context: Context):
    config = local_config(context)
    round_cfg = msg.content["config"]
    local = _local_data(config, context)
    model, tokenizer = attach(config["model.name"], LoraSpec.from_config(config), config["model.dtype"])
    received = from_arrays(msg.content["arrays"])
    if round_cfg["aggregation"] == "ffa":
        # FFA-LoRA: only B travels; A is the shared seed's, frozen. Make sure ours is the same.
        if a_factor_digest(adapter_state(model)) != round_cfg["lora-a-sha256"]:
            raise UserError("FFA-LoRA: this client's A factors differ from the server's (model or lora.seed mismatch)")
        received = {**adapter_state(model), **received}
    set_adapter_state(model, received)
    return config, round_cfg, local, model, tokenizer


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, round_cfg, local, model, tokenizer = _setup(msg, context)
    server_round, num_rounds = int(round_cfg["server-round"]), int(round_cfg["num-rounds"])
    run_id = str(round_cfg["run-id"])
    steps, batch = config["train.local-steps"], config["train.batch-size"]
    q = sample_rate(batch, len(local.train), where=f"client '{local.name}'")
    started = time.time()
    privacy = {"client": local.name, "dp": config["dp.enabled"], "noise_seed": "os-entropy"
               if config["dp.noise-seed"] < 0 else "fixed (not private against whoever knows it)"}
    ledger = entry = None
    sigma = None
    if config["dp.enabled"]:
        ledger_dir = ledger_directory(config, round_cfg, local.name, context)
        delta = config["dp.delta"] or default_delta(len(local.train))
        ledger = Ledger.open(ledger_dir, fingerprint=fingerprint(local.train), records=len(local.train), delta=delta)
        decision = decide(ledger, max_epsilon=config["dp.max-epsilon"], requested_sigma=config["dp.noise-multiplier"],
                          target_epsilon=config["dp.target-epsilon"], sample_rate=q, steps=steps,
                          rounds_left=num_rounds - server_round + 1,
                          max_noise_multiplier=config["dp.max-noise-multiplier"])
        entry = Entry(run_id=run_id, round=server_round, noise_multiplier=decision.noise_multiplier or 0.0,
                      clip_norm=config["dp.clip-norm"], sample_rate=q, steps=steps, delta=ledger.delta,
                      epsilon_after=0.0, epsilon_rdp_after=0.0, max_epsilon=config["dp.max-epsilon"], status="")
        if decision.refused:
            refused = ledger.refuse(entry, decision.reason)
            content = RecordDict({"privacy": ConfigRecord({**privacy, **_privacy_fields(refused, ledger)}),
                                  "metrics": MetricRecord({"num-examples": 0})})
            return Message(content=content, reply_to=msg)
        entry = ledger.reserve(entry)  # on disk before any record is touched
        sigma = decision.noise_multiplier
    aggregation = str(round_cfg["aggregation"])
    with frozen_a_factors(model, freeze=aggregation == "ffa"):
        result = train_adapter(model, tokenizer, Task.from_config(config), local.train, steps=steps, batch_size=batch,
                               lr=config["train.lr"], noise_multiplier=sigma, clip_norm=config["dp.clip-norm"],
                               seed=noise_seed(config["dp.noise-seed"], local.name, run_id, server_round),
                               grad_sample_mode=config["train.grad-sample-mode"], autocast=config["train.autocast"])
    if ledger is not None:
        entry = ledger.commit(entry)
        privacy.update(_privacy_fields(entry, ledger))
    else:
        privacy.update({"status": "no-dp", "sample_rate": q, "steps": steps})
    metrics = {"train_loss": result.loss, "num-examples": len(local.train), "steps": result.steps,
               "seconds": time.time() - started}
    content = RecordDict({"arrays": to_arrays(sent_tensors(adapter_state(model), aggregation),
                                                    config["server.wire-dtype"]),
                          "metrics": MetricRecord(metrics),
                          "privacy": ConfigRecord(privacy)})
    return Message(content=content, reply_to=msg)


def ledger_directory(config: dict, round_cfg, name: str, context: Context) -> Path:
    """A deployment's ledger lives in the site's own ``ledger-dir``, whatever the site is called.

    Keying it by name there would hand a fresh, unspent ledger to a site that renames itself.
    Simulated clients share one directory and are told apart by name.
    """
    if is_deployment(context):
        if not config["dp.ledger-dir"]:
            raise UserError("node config: 'ledger-dir' is required in a deployment (else each run resets the budget)")
        return Path(config["dp.ledger-dir"])
    return Path(config["dp.ledger-dir"] or Path(str(round_cfg["run-dir"])) / "ledgers") / name


def noise_seed(configured: int, *parts) -> int:
    """Seed of this round's Poisson sampling and Gaussian noise.

    By default fresh OS entropy: a seed derivable from what the server knows (run id,
    round, client name, a config seed) would let it regenerate the noise and subtract it.
    A configured seed >= 0 makes runs reproducible for debugging only, and is recorded
    as such in the privacy record.
    """
    if configured < 0:
        return secrets.randbits(63)
    return int(hashlib.sha256("|".join(map(str, (configured, *parts))).encode()).hexdigest()[:15], 16)


def _privacy_fields(entry: Entry, ledger: Ledger) -> dict:
    return {"status": entry.status, "noise_multiplier": entry.noise_multiplier, "clip_norm": entry.clip_norm,
            "sample_rate": entry.sample_rate, "steps": entry.steps, "delta": entry.delta,
            "epsilon": entry.epsilon_after, "epsilon_rdp": entry.epsilon_rdp_after,
            "max_epsilon": entry.max_epsilon, "accountant": entry.accountant, "sampling": entry.sampling,
            "records": ledger.records, "reason": entry.reason}


@app.evaluate("ship")
def evaluate_shipped(msg: Message, context: Context) -> Message:
    """A shipped GGUF: verify its sha256, store it in the model dir, evaluate it here, reply metrics only."""
    config = local_config(context)
    announced = dict(msg.content["config"])
    local = _local_data(config, context)
    path, metrics = receive_and_evaluate(msg.content["artifact"]["file"].numpy(), announced, config, local)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name, "stored": str(path),
                                                "quant": str(announced["quant"])})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    config, _, local, model, tokenizer = _setup(msg, context)
    metrics = evaluate(model, tokenizer, Task.from_config(config), local.test)
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(local.test)}),
                          "info": ConfigRecord({"client": local.name})})
    return Message(content=content, reply_to=msg)
