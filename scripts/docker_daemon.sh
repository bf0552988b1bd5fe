# Sourced by scripts/test.sh: the Docker daemon the container tests use, shared by the checkouts testing at once.
#
# docker_join: use the daemon that answers, else start Debian's dockerd in the background (no bridge, the
# machine's iptables left alone: the tests use host networking and network-less builds only), and hold a shared
# lock (fd 9) for as long as this run uses it. docker_leave, run on exit: the last run out stops the dockerd that
# a run started here (its pid in a file); a daemon started any other way is never stopped. Checking for,
# starting and stopping the daemon happen under a second lock (fd 8), one run at a time, and briefly: no run
# waits there for another one's tests.
#
# The locks and the pid file are in GROQ_PROXY_LOCK_DIR (default /run/lock); dockerd's log is .dockerd.log in
# the checkout whose run started it (git-ignored, replaced by the next start).
lock_dir=${GROQ_PROXY_LOCK_DIR:-/run/lock}
dockerd_pid_file=$lock_dir/groq-proxy-dockerd.pid

docker_join() {
  exec 8>>"$lock_dir/groq-proxy-docker-start.lock" 9>>"$lock_dir/groq-proxy-docker-users.lock"
  trap docker_leave EXIT
  flock -x 8
  if ! docker info >/dev/null 2>&1; then
    local log=$PWD/.dockerd.log pid
    # Its own session: the daemon outlives this run when another one still uses it.
    setsid dockerd --bridge=none --iptables=false >"$log" 2>&1 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$dockerd_pid_file"
    for _ in $(seq 300); do
      docker info >/dev/null 2>&1 && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; its log: $log" >&2; exit 1; }
  fi
  flock -s 9
  flock -u 8
}

docker_leave() {
  flock -x 8
  # Another run still holds its shared lock: it uses the daemon, and the last one out stops it.
  flock -xn 9 || return 0
  local pid
  pid=$(cat "$dockerd_pid_file" 2>/dev/null) || return 0
  rm -f "$dockerd_pid_file"
  # Gone already, or the pid now names another program.
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 0
  kill -TERM "$pid"
  # The run that started it reaps it with wait; any other one sees it gone once init has.
  wait "$pid" 2>/dev/null || true
  for _ in $(seq 600); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "dockerd (pid $pid) still runs 60 s after SIGTERM" >&2
}
