#!/usr/bin/env bash
# Distributed mask learning on a Ray cluster: join one, or start a head node here, then run the driver.
#
#   launch/train.sh [--address ADDR] CONFIG --output DIR [more `python -m compressor.launch` options]
#
# Cluster: given --address or $RAY_ADDRESS (host:port of a running head's GCS, or "auto"), it joins that
# cluster. Otherwise it starts a head node on this machine (`ray start --head --block`, its own temp dir,
# free ports unless RAY_PORT / RAY_DASHBOARD_PORT say otherwise), runs the job on it, and stops that head
# by its PID when it exits (never `ray stop`, which would stop every Ray cluster on the machine).
# Add GPU nodes to a head this script started with, on each node:
#   ray start --address=<head ip>:<port printed below> --block
# Extra `ray start` flags for the head: RAY_HEAD_ARGS="--num-gpus=8 --num-cpus=64".
# Python: $PYTHON, else .venv/bin/python beside this script's repository, else python3.
# --output must be on a filesystem every node sees, and every node needs this package installed (or use
# `ray job submit --working-dir .`, which ships the code).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
ray_cli="$(dirname "$(command -v "$python")")/ray"
[[ -x "$ray_cli" ]] || ray_cli="ray"

address="${RAY_ADDRESS:-}"
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --address=*) address="${1#--address=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ ${#args[@]} -eq 0 || "${args[0]}" == -* ]]; then
  echo "usage: launch/train.sh [--address ADDR] CONFIG --output DIR [--set key=value ...] [--resume]" >&2
  exit 2
fi

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
head_pid=""
head_dir=""

stop_head() {
  [[ -n "$head_pid" ]] || return 0
  echo "train.sh: stopping the head node this script started (pid $head_pid)"
  kill -TERM "$head_pid" 2>/dev/null || true  # ray start drains and stops its own processes
  for _ in $(seq 30); do kill -0 "$head_pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$head_pid" 2>/dev/null || true  # whatever is left of its process group
  head_pid=""
}
trap stop_head EXIT
trap 'exit 130' INT TERM

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

if [[ -n "$address" ]]; then
  echo "train.sh: joining the Ray cluster at $address"
else
  gcs_port="${RAY_PORT:-$(free_port)}"
  dashboard_port="${RAY_DASHBOARD_PORT:-$(free_port)}"
  # A private temp dir: a plain `ray.init()` elsewhere on this machine will not attach to this cluster.
  head_dir="$(mktemp -d /tmp/rayhead.XXXXXX)"
  echo "train.sh: no Ray cluster given (--address / RAY_ADDRESS): starting a head node on port $gcs_port," \
       "dashboard http://127.0.0.1:$dashboard_port, logs in $head_dir"
  # shellcheck disable=SC2086  # RAY_HEAD_ARGS is a list of flags
  setsid "$ray_cli" start --head --block --port="$gcs_port" --dashboard-port="$dashboard_port" \
    --include-dashboard=true --disable-usage-stats --temp-dir="$head_dir" \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" \
    --ray-client-server-port="$(free_port)" ${RAY_HEAD_ARGS:-} >"$head_dir/head.log" 2>&1 &
  head_pid=$!
  up=0
  for _ in $(seq 120); do
    if ! kill -0 "$head_pid" 2>/dev/null; then
      echo "train.sh: ray start exited; its log:" >&2; tail -30 "$head_dir/head.log" >&2; head_pid=""; exit 1
    fi
    if "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$dashboard_port/api/version', timeout=2)" \
         2>/dev/null; then
      up=1; break
    fi
    sleep 1
  done
  if [[ $up -ne 1 ]]; then
    echo "train.sh: the head node did not come up within 120 s; its log:" >&2; tail -30 "$head_dir/head.log" >&2; exit 1
  fi
  address="127.0.0.1:$gcs_port"
  # This machine's address as other nodes see it (a UDP "connect" sends nothing).
  node_ip="$("$python" -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("10.255.255.255", 1)); print(s.getsockname()[0])' 2>/dev/null || echo 127.0.0.1)"
  echo "train.sh: head node up (pid $head_pid); other nodes join with: ray start --address=$node_ip:$gcs_port --block"
fi

echo "train.sh: $python -m compressor.launch ${args[*]} --ray-address $address"
status=0
"$python" -m compressor.launch "${args[@]}" --ray-address "$address" || status=$?
echo "train.sh: compressor.launch exited with status $status"
exit "$status"
