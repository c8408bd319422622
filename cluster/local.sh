#!/usr/bin/env bash
# A Ray cluster on this machine with token auth, every node and port on loopback.
#
#   cluster/local.sh start [--workers N] [--gpus-per-worker G] [--cpus-per-worker C] [-- SWEEP ARGS]
#       without --workers: one head that runs the trials itself (one GPU box);
#       with --workers N:  a head that runs no trials and has no GPUs (like the cloud configs) plus N worker nodes,
#                          each with its own cache folder (a node's local disk) and G logical GPUs (Ray resource
#                          counts: requests, fractional packing and placement are real; without CUDA torch runs on
#                          the CPU)
#       then prints RAY_ADDRESS and the `ray job submit` line
#   cluster/local.sh submit-line [-- SWEEP ARGS]  print the line again (default args: --config sweeps/configs/demo.yaml)
#   cluster/local.sh stop                         stop every node; no process or port is left behind
#
# Environment: RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_DASHBOARD_AGENT_PORT (52365: the head's agent),
# RAY_NUM_CPUS / RAY_NUM_GPUS (the single head: detected), LASEGSEG_CLUSTER_DIR (.lasegseg/cluster: node cache
# folders and logs). Variables exported before `start` (AWS_*, MLFLOW_*) reach every node's processes. The token lives in ~/.ray/auth_token (created on first
# start; `ray get-auth-token` prints it). Every node is on 127.0.0.1 and listens there alone, so no other machine can
# join (clusters of machines: cluster/aws.yaml, gcp.yaml, kuberay/); a driver started by hand on this machine
# (RAY_ADDRESS=127.0.0.1:6379) needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to find its node there (jobs' drivers have it).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
gcs="${RAY_GCS_PORT:-6379}"
dash="${RAY_DASHBOARD_PORT:-8265}"
agent="${RAY_DASHBOARD_AGENT_PORT:-52365}"  # the head's dashboard agent (jobs run through it)
state="${LASEGSEG_CLUSTER_DIR:-$PWD/.lasegseg/cluster}"
tmp="${TMPDIR:-/tmp}/lasegseg-ray-$gcs"  # worker nodes' Ray temp dirs (short: Ray puts Unix sockets there)
RAY="$(command -v ray || true)"
[ -n "$RAY" ] || { echo "cluster/local.sh: error: ray is not on PATH (. .venv/bin/activate)" >&2; exit 2; }
PY="$(dirname "$RAY")/python"
[ -x "$PY" ] || PY="$(command -v python3)"
# `ray start` whose --node-ip-address=127.0.0.1 stays loopback (Ray would swap in the machine's outward address and
# listen on every interface): see cluster/ray_loopback.py.
ray_start() { "$PY" cluster/ray_loopback.py start "$@"; }
# Every process of the cluster (raylets, workers, job drivers) and a driver started from this script's environment
# find their node on 127.0.0.1 instead of the outward address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Variables a sweep's driver and trials need, passed by name in the submit line (the shell that runs it expands
# them: no secret is printed). MLFLOW_TRACKING_URI always, the others when set now.
PASSED=(MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN
        AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION
        LASEGSEG_STORAGE)

submit_line() {
  local sweep=("$@")
  [ "${#sweep[@]}" -gt 0 ] || sweep=(--config sweeps/configs/demo.yaml)
  local env_json="" key
  for key in "${PASSED[@]}"; do
    if [ "$key" = MLFLOW_TRACKING_URI ] || [ -n "${!key:-}" ]; then
      env_json+="${env_json:+, }\"$key\": \"\$$key\""
    fi
  done
  printf 'RAY_AUTH_MODE=token ray job submit --address=http://127.0.0.1:%s --working-dir=. ' "$dash"
  printf -- '--runtime-env-json="{\\"env_vars\\": {%s}}" -- python sweeps/fewshot.py' "${env_json//\"/\\\"}"
  printf ' %q' "${sweep[@]}"
  printf '\n'
}

usage() {
  sed -n '2,19p' "$0" >&2
  exit 2
}

start_workers() {  # N G C: worker nodes with their own cache folders and their own agent ports
  local n="$1" gpus="$2" cpus="$3" i port
  for ((i = 1; i <= n; i++)); do
    port=$((gcs + 100 * i))  # each node's agents need ports of their own on one machine
    mkdir -p "$state/node-$i/cache" "$tmp/node-$i"
    # Its own temp dir too, as on a machine of its own: nodes sharing one would share (and delete) each other's
    # copies of a job's working dir.
    LASEGSEG_CACHE="$state/node-$i/cache" ray_start "--address=127.0.0.1:$gcs" --node-ip-address=127.0.0.1 \
      "--temp-dir=$tmp/node-$i" \
      "--num-cpus=$cpus" "--num-gpus=$gpus" "--node-manager-port=$((port + 1))" \
      "--object-manager-port=$((port + 2))" "--dashboard-agent-listen-port=$((port + 3))" \
      "--dashboard-agent-grpc-port=$((port + 4))" "--metrics-export-port=$((port + 5))" \
      "--runtime-env-agent-port=$((port + 6))" --disable-usage-stats >"$state/node-$i/start.log" 2>&1 ||
      { cat "$state/node-$i/start.log" >&2; exit 1; }
  done
}

wait_listening() {  # PORT WHAT: until 127.0.0.1:PORT accepts a connection (60 s)
  local i
  for ((i = 0; i < 600; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "cluster/local.sh: error: $2 did not listen on 127.0.0.1:$1 within 60 s (see $state/head.log)" >&2
  return 1
}

start() {
  local workers=0 gpus=1 cpus="" sweep=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --gpus-per-worker) gpus="$2"; shift 2 ;;
      --cpus-per-worker) cpus="$2"; shift 2 ;;
      --) shift; sweep=("$@"); break ;;
      *) echo "cluster/local.sh: error: unknown option $1" >&2; usage ;;
    esac
  done
  [[ "$workers" =~ ^[0-9]+$ ]] || { echo "cluster/local.sh: error: --workers must be a whole number" >&2; exit 2; }
  [ -n "$cpus" ] || cpus=$(( $(nproc) / (workers > 0 ? workers : 1) )); [ "$cpus" -ge 1 ] || cpus=1
  mkdir -p "$state"
  "$RAY" get-auth-token --generate >/dev/null 2>&1
  local opts=(--head "--port=$gcs" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 "--dashboard-port=$dash"
              --disable-usage-stats)
  if [ "$workers" -gt 0 ]; then
    opts+=(--num-cpus=0 --num-gpus=0)  # the head runs the driver only, like the cloud configs
  else
    [ -z "${RAY_NUM_CPUS:-}" ] || opts+=("--num-cpus=$RAY_NUM_CPUS")
    [ -z "${RAY_NUM_GPUS:-}" ] || opts+=("--num-gpus=$RAY_NUM_GPUS")
  fi
  opts+=("--dashboard-agent-listen-port=$agent")
  ray_start "${opts[@]}" >"$state/head.log" 2>&1 || { cat "$state/head.log" >&2; exit 1; }
  # `ray start` returns before the head's dashboard agent, which takes job submissions, listens; a job submitted in
  # between is refused ("No available agent to submit job"). Wait for it and for the jobs API.
  wait_listening "$agent" "the head's dashboard agent" && wait_listening "$dash" "the dashboard" || exit 1
  start_workers "$workers" "$gpus" "$cpus"
  if [ "$workers" -gt 0 ]; then
    echo "Ray cluster up: a head (no trials, no GPUs) and $workers worker node(s) with $gpus GPU(s) and $cpus" \
      "CPU(s) each, caches under $state/node-*/cache (token auth; dashboard http://127.0.0.1:$dash)." >&2
  else
    echo "Ray head up (token auth; dashboard http://127.0.0.1:$dash)." >&2
  fi
  echo "export RAY_ADDRESS=http://127.0.0.1:$dash   # jobs API; nodes join at 127.0.0.1:$gcs" >&2
  echo "Submit a sweep from the project root:" >&2
  submit_line "${sweep[@]}"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  start) start "$@" ;;
  submit-line)
    [ "${1:-}" != "--" ] || shift
    submit_line "$@"
    ;;
  stop)
    "$RAY" stop --force >/dev/null 2>&1 || true
    rm -rf "$tmp"
    ;;
  *) usage ;;
esac
