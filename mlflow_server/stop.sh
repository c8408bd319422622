#!/usr/bin/env bash
# Stop the MLflow server started by mlflow_server/start.sh from the same MLFLOW_STATE_DIR: its whole process
# group (server and workers), TERM first, KILL after MLFLOW_STOP_TIMEOUT seconds (default 20).
set -euo pipefail

state="${MLFLOW_STATE_DIR:-$PWD/.mlflow_server}"
pidfile="$state/mlflow.pid"
if [ ! -f "$pidfile" ]; then
  echo "no MLflow server recorded in $state"
  exit 0
fi
pid="$(cat "$pidfile")"
[[ "$pid" =~ ^[0-9]+$ ]] || {
  echo "mlflow_server/stop.sh: error: $pidfile does not hold a pid" >&2
  exit 2
}

alive() { kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; }

if alive; then
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 "$((${MLFLOW_STOP_TIMEOUT:-20} * 10))"); do
    alive || break
    sleep 0.1
  done
  if alive; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do  # a killed process is gone once the kernel has torn it down: wait up to 10 s
      alive || break
      sleep 0.1
    done
  fi
  if alive; then
    echo "mlflow_server/stop.sh: error: process group $pid is still alive after KILL" >&2
    exit 1
  fi
fi
rm -f "$pidfile"
echo "stopped MLflow server (process group $pid)"
