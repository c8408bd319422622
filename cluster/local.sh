#!/usr/bin/env bash
# A Ray head on this machine with token auth and the dashboard on loopback only.
#
#   cluster/local.sh start [-- SWEEP ARGS]        ray start --head, then print the `ray job submit` line
#   cluster/local.sh submit-line [-- SWEEP ARGS]  print the line again (default args: --config sweeps/configs/demo.yaml)
#   cluster/local.sh stop                         ray stop
#
# Environment: RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS / RAY_NUM_GPUS (detected).
# The token lives in ~/.ray/auth_token (created on first start; `ray get-auth-token` prints it); other nodes join
# with RAY_AUTH_MODE=token and that token in RAY_AUTH_TOKEN: ray start --address=HEAD:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
gcs="${RAY_GCS_PORT:-6379}"
dash="${RAY_DASHBOARD_PORT:-8265}"
RAY="$(command -v ray || true)"
[ -n "$RAY" ] || { echo "cluster/local.sh: error: ray is not on PATH (. .venv/bin/activate)" >&2; exit 2; }

submit_line() {
  local sweep=("$@")
  [ "${#sweep[@]}" -gt 0 ] || sweep=(--config sweeps/configs/demo.yaml)
  # Credentials are referenced by name, never printed: the shell that runs the line expands them.
  local env_json="\"MLFLOW_TRACKING_URI\": \"\$MLFLOW_TRACKING_URI\""
  local key
  for key in MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_TOKEN; do
    if [ -n "${!key:-}" ]; then env_json+=", \"$key\": \"\$$key\""; fi
  done
  printf 'RAY_AUTH_MODE=token ray job submit --address=http://127.0.0.1:%s --working-dir=. ' "$dash"
  printf -- '--runtime-env-json="{\\"env_vars\\": {%s}}" -- python sweeps/fewshot.py' "${env_json//\"/\\\"}"
  printf ' %q' "${sweep[@]}"
  printf '\n'
}

cmd="${1:-}"
shift || true
[ "${1:-}" != "--" ] || shift
case "$cmd" in
  start)
    "$RAY" get-auth-token --generate >/dev/null 2>&1
    opts=(--head "--port=$gcs" --dashboard-host=127.0.0.1 "--dashboard-port=$dash" --disable-usage-stats)
    [ -z "${RAY_NUM_CPUS:-}" ] || opts+=("--num-cpus=$RAY_NUM_CPUS")
    [ -z "${RAY_NUM_GPUS:-}" ] || opts+=("--num-gpus=$RAY_NUM_GPUS")
    "$RAY" start "${opts[@]}" >&2
    echo "Ray head up (token auth; dashboard http://127.0.0.1:$dash). Submit a sweep from the project root:" >&2
    submit_line "$@"
    ;;
  submit-line) submit_line "$@" ;;
  stop) "$RAY" stop --force ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
