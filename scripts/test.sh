#!/usr/bin/env bash
# Installs everything into .venv (scripts/setup.sh), and the browser the playground's tests drive
# (Debian's chromium, where it is missing), then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  else
    echo "scripts/test.sh: the playground tests need Chromium (Debian: apt-get install chromium)" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
