"""One coordinator run against a site, in its own process (as each deployed ClientApp is).

Usage: python site_process.py NODE_CONFIG_JSON RUN_ID ROUNDS
Prints the privacy record of every reply that carried an adapter, one JSON object a line.
"""

import json
import sys
from pathlib import Path

from coordinator import Coordinator, Site


def main(node_config: str, run_id: str, rounds: int) -> None:
    site = Site.__new__(Site)
    site.node_config = json.loads(node_config)
    site.ledger_dir = Path(site.node_config["ledger-dir"])
    coordinator = Coordinator()
    for k in range(1, rounds + 1):
        reply = coordinator.train(site, run_id=run_id, server_round=k, num_rounds=2 * rounds)
        if "arrays" in reply.content:
            print(json.dumps({**dict(reply.content["privacy"]), "run": run_id, "round": k}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
