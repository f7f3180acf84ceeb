# Sourced: start/stop helpers for the cluster's background processes. Each runs in its own session
# (process group) with a pid file in $CLUSTER_RUN/pids and its log in $CLUSTER_LOGS.
proc_pidfile() { echo "$CLUSTER_RUN/pids/$1.pid"; }

# proc_alive NAME: the pid file names a live process that is still the one we started (its
# command line contains the name), so a recycled pid is never mistaken for ours.
proc_alive() {
  local f pid; f="$(proc_pidfile "$1")"
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$1"
}

proc_start() { # NAME CMD...
  local name=$1; shift
  mkdir -p "$CLUSTER_RUN/pids" "$CLUSTER_LOGS"
  echo "cluster-up: starting $name" >&2
  # 9>&-: the lock fd of up.sh must not live on in the servers.
  setsid nohup "$@" >>"$CLUSTER_LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$(proc_pidfile "$name")"
}

# proc_stop NAME GRACE_SECONDS: SIGTERM to the process group, then SIGKILL after the grace period.
proc_stop() {
  local name=$1 grace=$2 f pid i
  f="$(proc_pidfile "$name")"
  if proc_alive "$name"; then
    pid="$(cat "$f")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "cluster-down: stopped $name" >&2
  fi
  rm -f "$f"
}

wait_for() { # DESCRIPTION TIMEOUT_SECONDS CMD...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "cluster-up: timed out after ${timeout}s waiting for $what; logs in $CLUSTER_LOGS" >&2
      tail -n 20 "$CLUSTER_LOGS"/*.log >&2 || true
      return 1
    fi
    sleep 0.3
  done
}
