#!/usr/bin/env bash
# No timing flakes: the whole test command (scripts/test.sh) three times in a row while Debian's stress-ng keeps
# both cores busy (`stress-ng --cpu 2`). Stops at the first failing run, with its log's tail. stress-ng is bounded
# by STRESS_TIMEOUT (default 90m, above three runs here) and stopped at the end in any case.
# Usage: bash scripts/stress_suite.sh [pytest arguments]; RUNS=n changes the number of runs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v stress-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq stress-ng)
runs=${RUNS:-3}
logs=$(mktemp -d /tmp/groq-proxy-stress.XXXXXX)
stress-ng --cpu 2 --timeout "${STRESS_TIMEOUT:-90m}" --quiet &
stress_pid=$!
trap 'kill "$stress_pid" 2>/dev/null || true; wait "$stress_pid" 2>/dev/null || true' EXIT
echo "stress-ng --cpu 2 running (pid $stress_pid); the runs' logs go to $logs"
for run in $(seq "$runs"); do
  started=$(date +%s)
  if ! bash scripts/test.sh "$@" >"$logs/run-$run.log" 2>&1; then
    tail -40 "$logs/run-$run.log"
    echo "run $run of $runs failed after $(($(date +%s) - started)) s (log: $logs/run-$run.log)"
    exit 1
  fi
  kill -0 "$stress_pid" 2>/dev/null || { echo "stress-ng ended before run $run did: raise STRESS_TIMEOUT"; exit 1; }
  echo "run $run of $runs passed in $(($(date +%s) - started)) s: $(tail -1 "$logs/run-$run.log")"
done
