#!/usr/bin/env bash
# Creates (or updates) the virtual environment at .venv in the repository root and installs
# vllm_omni with its serving and test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=cuda
else
  FLAVOUR=cpu
fi

# Skip the resolver when nothing changed since the last successful install.
STAMP=.venv/.vllm_omni-install
WANT="$FLAVOUR $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VPY" -m pip install --disable-pip-version-check -q -e ".[$FLAVOUR,test]"
  echo "$WANT" > "$STAMP"
fi
# Always re-install the editable package metadata cheaply (entry points may have changed).
"$VPY" -m vllm_omni.platform_fixes install
