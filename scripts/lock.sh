#!/usr/bin/env bash
# Refreshes every lock the same way: one universal resolution per input (markers kept, so Debian 12's
# Python 3.11.2 and the current 3.11 install the same file), every file pinned with hashes, the current pins
# kept unless `--upgrade` is given. The locks are installed with `pip install --require-hashes --no-deps`,
# so what is written here is exactly what is installed; `tests/test_locks.py` checks each one is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${LOCK_TOOLS_VENV:-.venv-lock}
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install --quiet "uv==0.13.9"; }
for name in requirements requirements-dev requirements-fast requirements-redis requirements-metrics; do
  "$tools/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --no-strip-extras "$@" -o "$name.txt" "$name.in"
done
