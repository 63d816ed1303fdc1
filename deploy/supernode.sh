#!/usr/bin/env bash
# Start one fedslm SuperNode: Flower's flower-supernode, authenticated, over TLS, with this site's node config.
#
# Settings come from the environment, or from an env file (KEY=value lines, the format of a systemd
# EnvironmentFile) given as the only argument: deploy/supernode.sh [ENV_FILE]
#   FEDSLM_SUPERLINK     the SuperLink as host:port (its server.crt must name that host); required
#   FEDSLM_CA            the federation's ca.crt; required
#   FEDSLM_KEY           this node's private key from `python -m deploy.certs supernode`; required
#   FEDSLM_NODE_CONFIG   this site's node config, a TOML file; required, and checked by deploy/node_config.py
#                        (the first four keys and model-dir must be set, paths absolute). The ClientApp reads, for example
#                          name = "hospital-a"                     # the site's name in the coordinator's view (unique)
#                          data-path = "/srv/fedslm/records.jsonl"   # the local records (never leave the site)
#                          ledger-dir = "/var/lib/fedslm/ledger"   # the local privacy ledger
#                          max-epsilon = 8.0                       # the local budget, over all rounds and runs
#                          delta = 1e-6                            # optional (default min(1e-5, 0.1/records))
#                          model-dir = "smollm2"                   # 'smollm2', 'tiny' or an HF directory
#                          fields = "question,answer"              # the columns a coordinator may name
#                          shipped-dir = "/var/lib/fedslm/models"  # optional: where verified shipped GGUF files go
#                                                                  # (without it the site accepts no shipped models)
#                          test-data-path = "/srv/fedslm/held.jsonl" # optional: the held-out records (else
#                          test-fraction = 0.1                     #   this share of data-path, by record hash)
#                          evaluate = "off"                        # optional: off (default), dp, non-sensitive
#                        and max-train-examples, max-eval-examples, max-noise-multiplier, max-rounds,
#                        max-local-steps (client/site.py NODE_KEYS; docs/THREAT-MODEL.md)
#   FEDSLM_APPROVED_APPS this site's app allow-list: one `<sha256>  <comment>` line per approved app bundle,
#                        written by `python -m deploy.approve APP_DIR --allow-list FILE`; required (it may be
#                        empty: then every run is refused). Every ClientApp process checks the submitted
#                        bundle against it before unpacking anything (deploy/app_guard.py, started through
#                        deploy/site-bin/flwr-clientapp); it is read per message, so editing it needs no restart
#   FEDSLM_RUNTIME_PORT  port of the node's own Runtime API on 127.0.0.1, where its ClientApp processes
#                        connect (default 9094; one per SuperNode on a machine)
#   FEDSLM_VENV          virtualenv holding Flower and fedslm (default: the repository's .venv)
#   FLWR_HOME            where Flower unpacks approved app bundles, under approved/<sha256>/ (default ~/.flwr;
#                        one per SuperNode on a machine)
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
allow_list="${FEDSLM_APPROVED_APPS:-}"
approve="python -m deploy.approve APP_DIR --allow-list FILE"
[[ -n "$allow_list" ]] || { echo "supernode.sh: error: set FEDSLM_APPROVED_APPS to this site's app allow-list ($approve)" >&2; exit 2; }
[[ -f "$allow_list" && -r "$allow_list" ]] || { echo "supernode.sh: error: FEDSLM_APPROVED_APPS $allow_list is missing or unreadable ($approve)" >&2; exit 2; }
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m deploy.allow_list "$allow_list" || exit 2
# Exported: every task process inherits them (deploy/site-bin/flwr-clientapp and deploy/app_guard.py read
# them; the guard names the site in a refusal by the node config's `name`), absolute whatever a task's
# working directory.
export FEDSLM_APPROVED_APPS="$(realpath "$allow_list")" FEDSLM_VENV="$(cd "$venv" && pwd)"
export FEDSLM_NODE_CONFIG="$(realpath "$node_config")"
# The SuperNode starts flower-superexec from PATH (the virtualenv's), which starts each task's command from
# PATH: deploy/site-bin comes first, so flwr-clientapp is the guarded one and no other task command runs.
export PATH="$here/site-bin:$venv/bin:$PATH"
exec flower-supernode \
  --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --node-config "$node_config" \
  --host 127.0.0.1 --port "${FEDSLM_RUNTIME_PORT:-9094}"
