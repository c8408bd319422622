#!/usr/bin/env bash
# Start an MLflow tracking server for lasegseg sweeps, secure by default.
#
#   mlflow_server/start.sh local [--auth]   sqlite + local artifacts under $MLFLOW_STATE_DIR (or, when
#                                           MLFLOW_ARTIFACTS_DESTINATION is set, in that bucket, as production
#                                           does), proxied artifact serving, bound to 127.0.0.1 (--auth adds the
#                                           basic-auth app)
#   mlflow_server/start.sh production       PostgreSQL backend, S3-compatible artifact destination, proxied
#                                           artifacts, basic-auth app, allowed hosts; settings from the
#                                           environment only (see mlflow_server/production.env.example)
#
# Environment (both modes): MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
# MLFLOW_STATE_DIR (./.mlflow_server: pid file, log, generated auth config, local stores).
# With auth: MLFLOW_AUTH_ADMIN_PASSWORD (never stored in the repo; refused when it is a default or placeholder),
# MLFLOW_AUTH_ADMIN_USERNAME (admin), MLFLOW_AUTH_DATABASE_URI (default: the backend store URI).
# Production: MLFLOW_BACKEND_STORE_URI (postgresql://…), MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix; for
# MinIO or another S3 API also AWS_ENDPOINT_URL, as the sweeps' --storage-path s3://… uses, or
# MLFLOW_S3_ENDPOINT_URL, and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), MLFLOW_ALLOWED_HOSTS.
#
# Prints the tracking URI on success; stop with mlflow_server/stop.sh (same MLFLOW_STATE_DIR).
set -euo pipefail

die() {
  echo "mlflow_server/start.sh: error: $*" >&2
  exit 2
}

HERE="$(cd "$(dirname "$0")" && pwd)"
mode="${1:-}"
shift || true
auth=0
case "$mode" in
  local) ;;
  production) auth=1 ;;
  *) die "usage: start.sh local [--auth] | start.sh production" ;;
esac
for arg in "$@"; do
  case "$arg" in
    --auth) auth=1 ;;
    *) die "unknown option '$arg'" ;;
  esac
done

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
state="${MLFLOW_STATE_DIR:-$PWD/.mlflow_server}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
pidfile="$state/mlflow.pid"
logfile="$state/mlflow.log"
MLFLOW="${MLFLOW_BIN:-$(command -v mlflow || true)}"
[ -n "$MLFLOW" ] || die "mlflow is not on PATH (activate the project's venv: . .venv/bin/activate)"

case "$host" in
  127.* | localhost | ::1) loopback=1 ;;
  *) loopback=0 ;;
esac
if [ "$loopback" = 0 ] && [ "$auth" = 0 ]; then
  die "refusing to bind $host without authentication: anyone on the network could read and delete runs. " \
    "Use MLFLOW_HOST=127.0.0.1, or start with --auth (or the production mode)."
fi
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  die "a server from $state is already running (pid $(cat "$pidfile")); stop it with mlflow_server/stop.sh"
fi

args=(server --host "$host" --port "$port" --workers "$workers" --serve-artifacts)
# One S3 endpoint for everything: the sweeps' storage and the artifacts read the standard AWS_ENDPOINT_URL(_S3).
s3_endpoint() {
  if [ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ] && [ -n "${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}" ]; then
    export MLFLOW_S3_ENDPOINT_URL="${AWS_ENDPOINT_URL_S3:-$AWS_ENDPOINT_URL}"
  fi
}
if [ "$mode" = local ]; then
  backend="sqlite:///$state/mlflow.db"
  dest="${MLFLOW_ARTIFACTS_DESTINATION:-$state/mlartifacts}"
  case "$dest" in
    s3://*) s3_endpoint ;;
  esac
  args+=(--backend-store-uri "$backend" --artifacts-destination "$dest")
else
  backend="${MLFLOW_BACKEND_STORE_URI:-}"
  [ -n "$backend" ] || die "MLFLOW_BACKEND_STORE_URI is not set (e.g. postgresql://mlflow@db-host:5432/mlflow)"
  case "$backend" in
    postgresql://* | postgresql+*://*) ;;
    *) die "MLFLOW_BACKEND_STORE_URI must be a PostgreSQL URI (postgresql://…), got '${backend%%://*}://…'" ;;
  esac
  dest="${MLFLOW_ARTIFACTS_DESTINATION:-}"
  [ -n "$dest" ] || die "MLFLOW_ARTIFACTS_DESTINATION is not set (e.g. s3://my-bucket/mlflow)"
  # The store URI may hold a database password: it reaches mlflow through its environment variable, never
  # the command line (visible to every user in `ps`). Prefer PGPASSWORD or ~/.pgpass over a password in the URI.
  export MLFLOW_BACKEND_STORE_URI="$backend"
  s3_endpoint
  args+=(--artifacts-destination "$dest")
fi

if [ "$auth" = 1 ]; then
  password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
  case "$password" in
    "") die "MLFLOW_AUTH_ADMIN_PASSWORD is not set: choose an admin password (12+ characters) and export it" ;;
    password1234 | CHANGE_ME* | change-me* | changeme* | admin | password)
      die "MLFLOW_AUTH_ADMIN_PASSWORD is a default or placeholder value; change it before starting the server" ;;
  esac
  [ "${#password}" -ge 12 ] || die "MLFLOW_AUTH_ADMIN_PASSWORD must have at least 12 characters"
  auth_db="${MLFLOW_AUTH_DATABASE_URI:-}"
  if [ -z "$auth_db" ]; then
    if [ "$mode" = local ]; then auth_db="sqlite:///$state/basic_auth.db"; else auth_db="$backend"; fi
  fi
  # The auth app reads its database URI only from an ini file: write one, private to this user, from the
  # shipped template. '%' is ConfigParser's interpolation character, so it is doubled.
  ini="$state/basic_auth.ini"
  (
    umask 077
    sed "s|^database_uri = .*|database_uri = ${auth_db//%/%%}|" "$HERE/basic_auth.ini" >"$ini"
  )
  export MLFLOW_AUTH_CONFIG_PATH="$ini"
  export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  "$(dirname "$MLFLOW")/python" -c "import flask_wtf" 2>/dev/null \
    || die "the basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"
  # CSRF key shared by the workers; a fresh random one per start unless several servers must share one.
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
fi

allowed="${MLFLOW_ALLOWED_HOSTS:-}"
if [ "$loopback" = 0 ] && [ -z "$allowed" ]; then
  die "MLFLOW_ALLOWED_HOSTS is not set: list the host names clients use (e.g. mlflow.internal,mlflow.internal:$port)"
fi
[ "$allowed" != "*" ] || die "MLFLOW_ALLOWED_HOSTS='*' disables host-header checks; list the real host names"
[ -z "$allowed" ] || args+=(--allowed-hosts "$allowed")

# MLflow 3's job runner (GenAI scorers, trace roll-ups) starts about ten consumer processes of ~250 MB each beside
# the server; lasegseg's runs use none of it. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it back on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# A session of its own, so stop.sh can end the server and every worker it forked as one process group.
setsid "$MLFLOW" "${args[@]}" >"$logfile" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"

case "$host" in
  0.0.0.0 | ::) probe=127.0.0.1 ;;
  *) probe="$host" ;;
esac
url="http://$probe:$port"
for _ in $(seq 1 "${MLFLOW_START_TIMEOUT:-120}"); do
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pidfile"
    tail -n 30 "$logfile" >&2
    die "the server exited during start-up (log: $logfile)"
  fi
  if python3 - "$url/health" <<'EOF' 2>/dev/null; then
import sys
import urllib.request

urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
    echo "MLflow ($mode$([ "$auth" = 1 ] && echo ', basic auth')) at $url  pid $pid  log $logfile"
    echo "export MLFLOW_TRACKING_URI=$url"
    exit 0
  fi
  sleep 1
done
tail -n 30 "$logfile" >&2
"$HERE/stop.sh" >/dev/null 2>&1 || true
die "the server did not answer $url/health in time (log: $logfile)"
