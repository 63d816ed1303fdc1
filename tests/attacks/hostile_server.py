"""A malicious ServerApp: the attacks of docs/THREAT-MODEL.md sent to real SuperNodes.

A hostile coordinator controls its SuperLink and whatever ServerApp runs there, while the
sites approved the bundle they execute (deploy/app_guard.py): so the test bundles this
ServerApp next to the unmodified ClientApp and the sites approve that bundle. The run config
of the `flwr run` carries the run-config attacks (site-owned keys); this app adds the message
attacks (round numbers, replays, a site told every round is its last) between honest rounds,
and writes every reply's privacy record and metric names to <run.root>/<run.id>.hostile.json
(on the coordinator's side: all the test learns, it learns from replies).
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedslm.common.config import request_config
from slm.lora import LoraSpec, a_factor_digest, adapter_state, attach, sent_tensors, to_arrays

app = ServerApp()

# (label, server-round, num-rounds, run-id): what the coordinator claims in each train message.
ATTACKS = [  # a few: each costs every site a fresh ClientApp process (the unit suite has every variant)
    ("honest-1", 1, 3, "hostile"),
    ("round-past-the-end", 5, 3, "hostile"),
    ("crafted-adapter", 2, 3, "hostile"),  # a start the coordinator made up, not an aggregate
    ("wrong-a-factors", 3, 3, "hostile"),  # an A digest the site cannot match: refused before its ledger
    ("always-the-last-round-a", 1, 1, "hostile-b"),
    ("always-the-last-round-b", 1, 1, "hostile-c"),
]


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = request_config(context.run_config)  # a hostile coordinator skips our range checks
    model, _ = attach(config["model.name"], LoraSpec.from_config(config), config["model.dtype"])
    adapter = adapter_state(model)
    deadline = time.time() + 120
    while len(nodes := sorted(grid.get_node_ids())) < 2 and time.time() < deadline:
        time.sleep(1.0)
    results = []
    for label, server_round, num_rounds, run_id in ATTACKS:
        start = adapter
        if label == "crafted-adapter":  # every B entry set: far from the honest zero start
            start = {k: (v + 0.05 if ".lora_B." in k else v) for k, v in adapter.items()}
        digest = "0" * 64 if label == "wrong-a-factors" else a_factor_digest(adapter)
        round_cfg = {"num-rounds": num_rounds, "server-round": server_round, "run-id": run_id,
                     "run-dir": "/tmp/hostile-choice", "aggregation": "ffa", "lora-a-sha256": digest}
        content = RecordDict({"arrays": to_arrays(sent_tensors(start, "ffa"), "float16"),
                              "config": ConfigRecord(round_cfg)})
        messages = [Message(content=content, message_type="train", dst_node_id=n) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=300):
            if reply.has_error():
                results.append({"attack": label, "error": reply.error.reason})
                continue
            results.append({"attack": label, "privacy": dict(reply.content["privacy"]),
                            "metrics": sorted(reply.content["metrics"]), "released": "arrays" in reply.content})
    out = os.path.join(config["run.root"], f"{config['run.id']}.hostile.json")
    os.makedirs(config["run.root"], exist_ok=True)
    with open(out + ".tmp", "w") as handle:
        json.dump(results, handle)
    os.replace(out + ".tmp", out)
