#!/usr/bin/env bash
# The whole test suite from a fresh checkout: Debian's packages the tests run, a venv from the hash-pinned files,
# then lint, types, the size budget and the tests with the branch-coverage gate. Extra arguments go to pytest.
# Run as root on Debian 12: the container tests use Docker (README.md, "Development").
set -euo pipefail
cd "$(dirname "$0")/.."
# dockerd, debootstrap and nginx are in the sbin folders, which root's PATH lacks after `su` without `-`.
PATH=$PATH:/usr/sbin:/sbin
# Debian's python3 makes venvs only with python3-venv (ensurepip); the quota and deployment tests run Debian's
# redis-server, nginx and systemd-analyze; the quota tests step clocks with Debian's libfaketime (the service)
# and tests/clockshift.c, built with cc (redis-server); the container tests Debian's Docker (docker.io) and
# debootstrap, which makes their base image.
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
.venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.txt -r requirements-redis.txt -r requirements-metrics.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python scripts/size_budget.py

# A Docker daemon: the one that answers, else Debian's dockerd started here in the background and stopped at the
# end. The tests use host networking and network-less builds only, so this one makes no bridge and leaves the
# machine's iptables alone. Checkouts testing at once share one daemon: each run holds a shared lock (fd 9) while
# it uses Docker, and the run that started dockerd stops it only once no other run holds that lock. Checking for,
# starting and stopping the daemon happen under a second lock (fd 8), one run at a time.
exec 8>>/tmp/groq-proxy-docker-start.lock 9>>/tmp/groq-proxy-docker-users.lock
dockerd_pid=""
stop_dockerd() {
  [ -n "$dockerd_pid" ] || return 0
  flock -x 8
  if flock -x -w 1800 9; then
    kill -TERM "$dockerd_pid" && wait "$dockerd_pid" || true
  else
    echo "another test run still uses dockerd (pid $dockerd_pid): left running" >&2
  fi
}
trap stop_dockerd EXIT
flock -x 8
if ! docker info >/dev/null 2>&1; then
  dockerd_log=$(mktemp /tmp/groq-proxy-dockerd.XXXXXX.log)
  dockerd --bridge=none --iptables=false >"$dockerd_log" 2>&1 8>&- 9>&- &
  dockerd_pid=$!
  for _ in $(seq 300); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; its log: $dockerd_log" >&2; exit 1; }
fi
flock -s 9
flock -u 8
status=0
.venv/bin/python -m pytest --cov --cov-report=term "$@" || status=$?
exit "$status"
