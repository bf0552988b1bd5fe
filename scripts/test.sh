#!/usr/bin/env bash
# The whole test suite from a fresh checkout: a venv from the hash-pinned files, then lint, types,
# the size budget and the tests with the branch-coverage gate. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# The quota and deployment tests run Debian's redis-server, nginx and systemd-analyze; the quota tests step
# clocks with Debian's libfaketime (the service) and tests/clockshift.c, built with cc (redis-server).
missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing faketime"
command -v cc >/dev/null || missing="$missing gcc libc6-dev"
[ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
[ -z "$missing" ] || (apt-get update -qq && apt-get install -y -qq $missing)
.venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.txt -r requirements-redis.txt -r requirements-metrics.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python scripts/size_budget.py
exec .venv/bin/python -m pytest --cov --cov-report=term "$@"
