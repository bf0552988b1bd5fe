#!/usr/bin/env bash
# The whole test suite from a fresh checkout: Debian's packages the tests run, a venv from the hash-pinned files,
# then lint, types, the size budget and the tests with the branch-coverage gate. Extra arguments go to pytest.
# Run as root on Debian 12: the container tests use Docker (docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# dockerd, debootstrap and nginx are in the sbin folders, which root's PATH lacks after `su` without `-`.
PATH=$PATH:/usr/sbin:/sbin
# Debian's python3 makes venvs only with python3-venv (ensurepip); the quota and deployment tests run Debian's
# redis-server, nginx and systemd-analyze; the quota tests step clocks with Debian's libfaketime (the service)
# and tests/clockshift.c, built with cc (redis-server); the container tests Debian's Docker (docker.io) and
# debootstrap, which makes their base image.
# Every optional lock is installed (the fast extra too, so the upstream tests run on both transports); tests
# that need the default install without an extra build a venv without it (tests/test_upstream_transport.py).
missing=""
python3 -c 'import ensurepip' 2>/dev/null || missing="$missing python3 python3-venv"
command -v redis-server >/dev/null || missing="$missing redis-server"
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing faketime"
command -v cc >/dev/null || missing="$missing gcc libc6-dev"
[ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
command -v dockerd >/dev/null && command -v docker >/dev/null || missing="$missing docker.io"
command -v debootstrap >/dev/null || missing="$missing debootstrap"
[ -z "$missing" ] || (apt-get update -qq && apt-get install -y -qq $missing)
# A venv without pip is one that failed half-way (python3-venv was missing): made again.
[ -x .venv/bin/pip ] || python3 -m venv --clear .venv
# The fast extra's aiohttp transport is tested beside httpx; its HTTP parser, httptools, is left out of the test venv
# (uvicorn takes it whenever it is installed), so the suite's servers run h11, the default deployment's parser.
awk '/^httptools==/ {skip = 1; next} skip && /^ / {next} {skip = 0; print}' requirements-fast.txt >.venv/requirements-fast-transport.txt
.venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.txt -r requirements-redis.txt -r requirements-metrics.txt -r .venv/requirements-fast-transport.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python scripts/size_budget.py

# A Docker daemon for the container tests, shared with the other checkouts testing at once, stopped by the last
# run out when a run started it (scripts/docker_daemon.sh).
source scripts/docker_daemon.sh
docker_join
status=0
.venv/bin/python -m pytest --cov --cov-report=term "$@" || status=$?
exit "$status"
