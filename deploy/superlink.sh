#!/usr/bin/env bash
# Start the fedslm SuperLink: Flower's flower-superlink with TLS and SuperNode authentication.
#
# Settings come from the environment, or from an env file (KEY=value lines, the format of a systemd
# EnvironmentFile) given as the only argument: deploy/superlink.sh [ENV_FILE]
#   FEDSLM_CREDENTIALS  directory from `python -m deploy.certs superlink DIR` (ca.crt, server.crt, server.key); required
#   FEDSLM_HOST         address to listen on (default 127.0.0.1; a real federation sets the coordinator's
#                       address, e.g. 0.0.0.0, and server.crt must name it: deploy.certs --san)
#   FEDSLM_PORT         the one HTTP port of Fleet, Control and Runtime APIs (default 8000)
#   FEDSLM_DATABASE     state file; it holds the registered SuperNode keys, so it must survive restarts
#                       (default $FLWR_HOME/superlink.db, FLWR_HOME defaulting to ~/.flwr)
#   FEDSLM_VENV         virtualenv holding Flower and fedslm (default: the repository's .venv)
#
# `exec` makes this script's PID the SuperLink's: systemd and the tests stop it by that PID.
# Runtime dependency installation is off: a SuperLink must never `uv sync` what a submitted app asks for.
set -euo pipefail
if [[ $# -ge 1 ]]; then set -a; source "$1"; set +a; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FEDSLM_VENV:-$here/../.venv}"
creds="${FEDSLM_CREDENTIALS:?set FEDSLM_CREDENTIALS to the directory holding ca.crt, server.crt and server.key}"
flwr_home="${FLWR_HOME:-$HOME/.flwr}"
for f in ca.crt server.crt server.key; do
  [[ -r "$creds/$f" ]] || { echo "superlink.sh: error: $creds/$f is missing (python -m deploy.certs superlink $creds)" >&2; exit 2; }
done
[[ -x "$venv/bin/flower-superlink" ]] || { echo "superlink.sh: error: $venv/bin/flower-superlink not found (set FEDSLM_VENV)" >&2; exit 2; }
mkdir -p "$flwr_home"
export PATH="$venv/bin:$PATH"  # the SuperLink starts flower-superexec and flwr-serverapp from PATH
exec flower-superlink \
  --ssl-ca-certfile "$creds/ca.crt" --ssl-certfile "$creds/server.crt" --ssl-keyfile "$creds/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "${FEDSLM_HOST:-127.0.0.1}" --port "${FEDSLM_PORT:-8000}" \
  --database "${FEDSLM_DATABASE:-$flwr_home/superlink.db}"
