#!/usr/bin/env bash
# Start one fedslm SuperNode: Flower's flower-supernode, authenticated, over TLS, with this site's node config.
#
# Settings come from the environment, or from an env file (KEY=value lines, the format of a systemd
# EnvironmentFile) given as the only argument: deploy/supernode.sh [ENV_FILE]
#   FEDSLM_SUPERLINK     the SuperLink as host:port (its server.crt must name that host); required
#   FEDSLM_CA            the federation's ca.crt; required
#   FEDSLM_KEY           this node's private key from `python -m deploy.certs supernode`; required
#   FEDSLM_NODE_CONFIG   this site's node config, a TOML file; required, and checked by deploy/node_config.py
#                        (the first three keys must be set, paths absolute). The ClientApp reads
#                          data-path = "/srv/fedslm/records.jsonl"   # the local records (never leave the site)
#                          ledger-dir = "/var/lib/fedslm/ledger"   # the local privacy ledger
#                          max-epsilon = 8.0                       # the local budget, over all rounds and runs
#                          delta = 1e-6                            # optional (default min(1e-5, 0.1/records))
#                          model-dir = "smollm2"                   # optional: 'smollm2', 'tiny' or an HF directory
#                          name = "hospital-a"                     # optional: the site's name in the coordinator's view
#                          shipped-dir = "/var/lib/fedslm/models"  # optional: where verified shipped GGUF files go
#   FEDSLM_RUNTIME_PORT  port of the node's own Runtime API on 127.0.0.1, where its ClientApp processes
#                        connect (default 9094; one per SuperNode on a machine)
#   FEDSLM_VENV          virtualenv holding Flower and fedslm (default: the repository's .venv)
#   FLWR_HOME            where Flower unpacks the app bundle (default ~/.flwr; one per SuperNode on a machine)
#   FEDSLM_CACHE         the converted base model cache (default ~/.cache/fedslm), read by every ClientApp process
#
# `exec` makes this script's PID the SuperNode's; its flower-superexec and flwr-clientapp children share
# its process group, so stopping the group stops them all.
set -euo pipefail
if [[ $# -ge 1 ]]; then set -a; source "$1"; set +a; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FEDSLM_VENV:-$here/../.venv}"
superlink="${FEDSLM_SUPERLINK:?set FEDSLM_SUPERLINK to the SuperLink address host:port}"
ca="${FEDSLM_CA:?set FEDSLM_CA to the federation ca.crt}"
key="${FEDSLM_KEY:?set FEDSLM_KEY to this SuperNode private key}"
node_config="${FEDSLM_NODE_CONFIG:?set FEDSLM_NODE_CONFIG to this site node config (a .toml file)}"
for f in "$ca" "$key" "$node_config"; do
  [[ -r "$f" ]] || { echo "supernode.sh: error: $f is missing or unreadable" >&2; exit 2; }
done
[[ "$node_config" == *.toml ]] || { echo "supernode.sh: error: FEDSLM_NODE_CONFIG must end in .toml (Flower reads it as a file only then)" >&2; exit 2; }
[[ -x "$venv/bin/flower-supernode" ]] || { echo "supernode.sh: error: $venv/bin/flower-supernode not found (set FEDSLM_VENV)" >&2; exit 2; }
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m deploy.node_config "$node_config" || exit 2
export PATH="$venv/bin:$PATH"  # the SuperNode starts flower-superexec, which starts flwr-clientapp, from PATH
exec flower-supernode \
  --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --node-config "$node_config" \
  --host 127.0.0.1 --port "${FEDSLM_RUNTIME_PORT:-9094}"
