#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine (the container-attribution tests and the compose
# demo need one). Under systemd it starts docker.service. CI machines and sandboxes often have no init
# system, so there, when `docker info` fails, it starts `dockerd` in the background itself, logging to
# $DOCKERD_LOG, and waits for it.
# If the default start fails (no iptables, overlay on overlay), it retries without networking features
# the tests do not use (they run containers with --network host) and with the vfs storage driver.
# Exit status: 0 when the engine answers, 1 (with the log's tail) when it cannot be started.
set -uo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/gpu-exporter-dockerd.log}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

engine_up() { $SUDO docker info >/dev/null 2>&1; }

wait_for_engine() {
  local pid="$1" i
  for i in $(seq 1 60); do
    if engine_up; then return 0; fi
    if ! $SUDO kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.5
  done
  return 1
}

if engine_up; then echo "start-dockerd: Docker engine already running"; exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "start-dockerd: dockerd is not installed (apt-get install docker.io)" >&2
  exit 1
fi

# Where systemd runs the machine, its docker.service is the engine (setup.sh keeps services from
# starting during its apt-get install).
if [ -d /run/systemd/system ] && $SUDO systemctl cat docker.service >/dev/null 2>&1; then
  echo "start-dockerd: systemctl start docker"
  if $SUDO systemctl start docker && for _ in $(seq 1 60); do engine_up && break; sleep 0.5; done && engine_up; then
    echo "start-dockerd: Docker engine up (docker.service)"
    exit 0
  fi
  echo "start-dockerd: docker.service did not come up (journalctl -u docker); starting dockerd by hand" >&2
fi

for flags in "" "--iptables=false --bridge=none --storage-driver=vfs"; do
  echo "start-dockerd: starting dockerd ${flags:-(default flags)}; log: $DOCKERD_LOG"
  # shellcheck disable=SC2086  # flags is a word list on purpose
  $SUDO sh -c "nohup dockerd $flags >>'$DOCKERD_LOG' 2>&1 & echo \$! > /run/gpu-exporter-dockerd.pid"
  pid="$(cat /run/gpu-exporter-dockerd.pid)"
  if wait_for_engine "$pid"; then
    echo "start-dockerd: Docker engine up (pid $pid)"
    exit 0
  fi
  $SUDO kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  $SUDO rm -f /var/run/docker.pid
done
echo "start-dockerd: could not start dockerd; last log lines:" >&2
tail -n 20 "$DOCKERD_LOG" >&2
exit 1
