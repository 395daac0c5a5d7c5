#!/usr/bin/env bash
# Installs everything the exporter, its tests and the demo need on a fresh Debian machine:
# Prometheus + promtool, Alertmanager + amtool, the Docker engine, busybox (for test images),
# PyTorch (CPU build), and this package with its server, docker and test extras.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_packages=(prometheus prometheus-alertmanager victoria-metrics docker.io busybox-static)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start services on install where an init system exists; the tests start their own
  # instances on loopback ports, so stop the packaged ones just started (ports and CPU). Only here:
  # on a later run this must not kill a Prometheus that a test or the demo is running.
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter victoria-metrics; do
    $SUDO pkill -x "$svc" >/dev/null 2>&1 || true
  done
fi

# The Docker engine: the container-attribution tests and the compose demo need a running dockerd.
# Not fatal here: without it the docker tests fail with the reason, and everything else still runs.
bash scripts/start-dockerd.sh || echo "setup: WARNING: no Docker engine; tests marked docker will fail"

PY="${PYTHON:-python3}"
# torch first and pinned: a range would pull the multi-GB CUDA build from the registry.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[server,docker,test,dashboards,bench]"
echo "setup: done"
