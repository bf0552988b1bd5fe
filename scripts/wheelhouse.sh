#!/usr/bin/env bash
# Fills wheels/ with every file the runtime locks pin, so `docker build --build-arg OFFLINE=true` needs no
# network (docs/deployment.md, "Container"; the container tests build that way). The files come from the index with
# `pip download --require-hashes --no-deps`, each checked against its lock's hashes, for the image's Python and
# platform whatever the host's: CPython 3.11 on x86-64 Linux (the manylinux tags up to glibc 2.28; Debian 12 has
# 2.36). Markers that test only the Python version are dropped first, since the host's pip evaluates them with
# its own Python: the wheelhouse must hold what any Python 3.11 may install (async-timeout, needed below 3.11.3, is
# skipped by a newer host otherwise); the image's own pip applies them when it installs. Any other marker (none
# in the runtime locks today) is kept whole, and evaluated on the host: right when the host is Linux too.
# Usage: bash scripts/wheelhouse.sh [PYTHON], PYTHON (default .venv/bin/python) running pip on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version="python(_full)?_version [<>=!~]+ '[^']*'"
for lock in requirements.txt requirements-fast.txt requirements-metrics.txt requirements-redis.txt; do
  sed -E "s/ ; $version( (and|or) $version)* \\\\$/ \\\\/" "$lock" >"$work/$lock"
done
"$python" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
  --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest wheels -r "$work/requirements.txt" -r "$work/requirements-fast.txt" \
  -r "$work/requirements-metrics.txt" -r "$work/requirements-redis.txt"
