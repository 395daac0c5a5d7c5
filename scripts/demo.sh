#!/usr/bin/env bash
# The whole alert path on one machine, in about a minute:
#   exporter (simulated GPUs when this machine has none) + the sample training workload with the hook
#   -> a real Prometheus with the shipped rules (fast profile) -> a real Alertmanager with the shipped
#   fast config -> a tiny webhook receiver that prints every notification.
# It injects a fault (XID 79 "fell off the bus" on simulated GPU 5, and a CUDA out-of-memory in the
# training job), prints the notifications as they arrive and the URLs to look at, then recovers the
# GPU, shows the resolved notification and cleans everything up.
#
#   bash scripts/demo.sh              # installs what is missing (scripts/setup.sh), then runs
#   bash scripts/demo.sh --no-setup   # skip the install step (everything already installed)
#   bash scripts/demo.sh --keep       # leave the stack running after the alert until Ctrl-C
#
# Runs with the project virtualenv's Python (.venv, made by scripts/setup.sh); DEMO_PYTHON overrides it.
# Exit status 0 when the page arrived, 1 when it did not within DEMO_TIMEOUT seconds (default 90).
# Ports (all on 127.0.0.1): DEMO_EXPORTER_PORT (9835), DEMO_PROMETHEUS_PORT (9090),
# DEMO_ALERTMANAGER_PORT (9093), DEMO_WEBHOOK_PORT (9099).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

SETUP=1
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --no-setup) SETUP=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

PY="${DEMO_PYTHON:-$ROOT/.venv/bin/python}"
TIMEOUT="${DEMO_TIMEOUT:-90}"
EXPORTER_PORT="${DEMO_EXPORTER_PORT:-9835}"
PROMETHEUS_PORT="${DEMO_PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${DEMO_ALERTMANAGER_PORT:-9093}"
WEBHOOK_PORT="${DEMO_WEBHOOK_PORT:-9099}"
EXPORTER="http://127.0.0.1:${EXPORTER_PORT}"
PROMETHEUS="http://127.0.0.1:${PROMETHEUS_PORT}"
ALERTMANAGER="http://127.0.0.1:${ALERTMANAGER_PORT}"

say() { printf '\n== %s\n' "$*"; }
die() { echo "demo.sh: $*" >&2; exit 1; }

if [ "$SETUP" = 1 ]; then
  say "installing what is missing (scripts/setup.sh; --no-setup skips this)"
  bash scripts/setup.sh
fi

[ -x "$PY" ] || command -v "$PY" >/dev/null || die "no $PY: run scripts/setup.sh (it makes the virtualenv .venv)"
command -v prometheus >/dev/null || die "prometheus is not installed: run scripts/setup.sh (apt-get install prometheus)"
AM_BIN="$(command -v prometheus-alertmanager || command -v alertmanager || true)"
[ -n "$AM_BIN" ] || die "Alertmanager is not installed: run scripts/setup.sh (apt-get install prometheus-alertmanager)"

port_free() { "$PY" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$1" 2>/dev/null; }
for pair in "EXPORTER:$EXPORTER_PORT" "PROMETHEUS:$PROMETHEUS_PORT" "ALERTMANAGER:$ALERTMANAGER_PORT" "WEBHOOK:$WEBHOOK_PORT"; do
  port_free "${pair#*:}" || die "port ${pair#*:} is in use: set DEMO_${pair%%:*}_PORT to a free one"
done
"$PY" -c "import exporter, workload, torch" 2>/dev/null || die "the exporter, workload or torch is not importable by $PY: run scripts/setup.sh"

WORK="$(mktemp -d -t gpu-exporter-demo.XXXXXX)"
# Whatever the stack puts in a temporary folder (torch's compile cache, ...) goes with $WORK.
mkdir "$WORK/tmp"
export TMPDIR="$WORK/tmp"
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  echo "demo: stopped everything and removed $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start NAME CMD... : run in the background, output to $WORK/NAME.log
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
}

# wait_http URL SECONDS NAME: until URL answers 2xx, or fail with the component's log.
wait_http() {
  local deadline=$((SECONDS + $2))
  until "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "demo: $3 did not come up at $1; its log:" >&2; tail -n 30 "$WORK/$3.log" >&2 || true; exit 1
    fi
    sleep 0.3
  done
}

# Real GPUs when NVML answers, simulated ones otherwise.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  MODE=real; EXPORTER_ARGS=()
else
  MODE=simulated; EXPORTER_ARGS=(--simulate healthy-8gpu)
fi

say "starting the webhook receiver, Alertmanager, the exporter ($MODE GPUs) and Prometheus"
start webhook "$PY" -u scripts/webhook_receiver.py --port "$WEBHOOK_PORT"
sed "s#http://127.0.0.1:9099#http://127.0.0.1:${WEBHOOK_PORT}#g" alerts/alertmanager-fast.yml >"$WORK/alertmanager.yml"
start alertmanager "$AM_BIN" --config.file="$WORK/alertmanager.yml" --storage.path="$WORK/am-data" \
  --web.listen-address="127.0.0.1:${ALERTMANAGER_PORT}" --cluster.listen-address=
start exporter "$PY" -m exporter --listen "127.0.0.1:${EXPORTER_PORT}" --interval 0.5 --training-ttl 10 \
  "${EXPORTER_ARGS[@]}"
sed -e "s#__ALERTS_DIR__#${ROOT}/alerts#" -e "s#__EXPORTER__#'127.0.0.1:${EXPORTER_PORT}'#" \
  -e "s#__ALERTMANAGER__#'127.0.0.1:${ALERTMANAGER_PORT}'#" alerts/prometheus-fast.yml >"$WORK/prometheus.yml"
start prometheus prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom-data" \
  --web.listen-address="127.0.0.1:${PROMETHEUS_PORT}" --rules.alert.resend-delay=1s
deadline=$((SECONDS + 20))
until grep -q listening "$WORK/webhook.log" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { cat "$WORK/webhook.log" >&2; die "the webhook receiver did not start"; }
  sleep 0.2
done
wait_http "$ALERTMANAGER/-/ready" 30 alertmanager
wait_http "$EXPORTER/readyz" 30 exporter
wait_http "$PROMETHEUS/-/ready" 30 prometheus

say "starting the sample training job (job demo-train) with the hook; it will hit a CUDA OOM at step 40"
OMP_NUM_THREADS=1 start train "$PY" -m workload.train --job demo-train --exporter-url "$EXPORTER" \
  --steps 0 --duration 300 --step-delay 0.05 --batch-size 4 --image-size 16 --width 8 --log-every 0 \
  --fault oom@40
deadline=$((SECONDS + 60))
until "$PY" -c "import sys,urllib.request; sys.exit('training_steps_total{' not in urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())" "$EXPORTER/metrics" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "demo: the training job never reported; its log:" >&2; tail -n 30 "$WORK/train.log" >&2; exit 1; }
  sleep 0.5
done
echo "training job is reporting to the exporter"
# The always-firing GpuWatchdog reaching the receiver proves Prometheus -> Alertmanager -> webhook works.
deadline=$((SECONDS + 30))
until grep -q "FIRING GpuWatchdog" "$WORK/webhook.log"; do
  [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$WORK/prometheus.log" "$WORK/alertmanager.log" >&2; die "the alert path is not connected (no GpuWatchdog notification)"; }
  sleep 0.3
done
echo "alert path connected: the GpuWatchdog notification reached the webhook receiver"

# The fault whose page we wait for.
if [ "$MODE" = simulated ]; then
  WANT="FIRING GpuLost"
  say "injecting XID 79 (GPU fell off the bus) on simulated GPU 5 at $(date +%T)"
  "$PY" -c "
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + '/-/simulate/events', data=json.dumps({'gpu': 5, 'xid': 79}).encode(),
                             headers={'Content-Type': 'application/json'}, method='POST')
print(urllib.request.urlopen(req, timeout=5).read().decode())" "$EXPORTER"
else
  WANT="FIRING GpuTrainingOutOfMemory"
  say "real GPUs: waiting for the training job's injected CUDA OOM (step 40)"
fi

say "notifications (Alertmanager -> webhook), waiting up to ${TIMEOUT}s for '${WANT}'"
tail -n +1 -f "$WORK/webhook.log" &
TAIL_PID=$!
PIDS+=("$TAIL_PID")
deadline=$((SECONDS + TIMEOUT))
until grep -q "$WANT" "$WORK/webhook.log"; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "demo: no '${WANT}' notification within ${TIMEOUT}s. Logs are in the tails below." >&2
    for f in exporter prometheus alertmanager train; do echo "--- $f" >&2; tail -n 15 "$WORK/$f.log" >&2; done
    exit 1
  fi
  sleep 0.2
done
sleep 1  # let the tail print the lines that came with it

cat <<MSG

== the page arrived. Look around (while the stack runs):
  exporter metrics:    $EXPORTER/metrics
  Prometheus alerts:   $PROMETHEUS/alerts
  Alertmanager:        $ALERTMANAGER/#/alerts
  runbooks:            $ROOT/alerts/runbooks/
MSG

if [ "$MODE" = simulated ]; then
  say "recovering GPU 5 (reset worked); waiting for the resolved notification"
  "$PY" -c "
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + '/-/simulate/events', data=json.dumps({'gpu': 5, 'lost': False}).encode(),
                             headers={'Content-Type': 'application/json'}, method='POST')
urllib.request.urlopen(req, timeout=5).read()" "$EXPORTER"
  deadline=$((SECONDS + 30))
  until grep -q "RESOLVED GpuLost" "$WORK/webhook.log"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "demo: no resolved notification within 30 s (a loaded machine)"; break; }
    sleep 0.2
  done
  sleep 0.5
fi

if [ "$KEEP" = 1 ]; then
  say "--keep: the stack keeps running; Ctrl-C stops it and cleans up"
  wait "${PIDS[0]}" || true
fi
say "demo done"
exit 0
