#!/usr/bin/env bash
# Fills wheels/ with every file the runtime locks pin, so `docker build --build-arg OFFLINE=true` needs no
# network (README.md, "Container"; the container tests build that way). The files come from the index with
# `pip download --require-hashes --no-deps`, each checked against its lock's hashes. Environment markers are
# dropped first: the wheelhouse must hold what any Python 3.11 may install (async-timeout, needed below 3.11.3,
# is skipped by a newer pip host otherwise); the image's own pip applies them when it installs.
# Usage: bash scripts/wheelhouse.sh [PYTHON], PYTHON (default .venv/bin/python) running pip on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for lock in requirements.txt requirements-fast.txt requirements-metrics.txt requirements-redis.txt; do
  sed -E 's/ ; [^\\]*( \\)$/\1/' "$lock" >"$work/$lock"
done
"$python" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
  --dest wheels -r "$work/requirements.txt" -r "$work/requirements-fast.txt" \
  -r "$work/requirements-metrics.txt" -r "$work/requirements-redis.txt"
