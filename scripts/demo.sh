#!/usr/bin/env bash
# First version of the demo: set up, then run the exporter on the simulated healthy 8-GPU node.
# (The full demo with training, Prometheus and Alertmanager replaces this script later.)
# Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
LISTEN="${GPU_EXPORTER_LISTEN:-127.0.0.1:9835}"
cat <<MSG

gpu-exporter is starting on simulated GPUs (scenario healthy-8gpu) at http://${LISTEN}
  curl -s http://${LISTEN}/metrics | grep ^gpu_temperature_celsius   # the metrics Prometheus scrapes
  curl -s http://${LISTEN}/status                                     # what was found, as JSON
  curl -s http://${LISTEN}/readyz                                     # 200 once the first poll is in
Ctrl-C stops it.

MSG
exec "$PY" -m exporter --simulate healthy-8gpu --listen "$LISTEN" --interval 1
