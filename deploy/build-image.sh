#!/usr/bin/env bash
# Build the sidecar image from deploy/Dockerfile, then smoke-test it: run it the way the sidecar runs
# (read-only root, no capabilities, host PID namespace, Docker socket read-only) on simulated GPUs,
# wait for its own HEALTHCHECK to report "healthy" and scrape /metrics.
#
#   bash deploy/build-image.sh                 # image gpu-exporter:local
#   IMAGE=registry.example/gpu-exporter:1.0 bash deploy/build-image.sh
#
# Where the Dockerfile's base (python:3.11-slim-bookworm) cannot be pulled (no registry reachable, as
# on our CI machines) it makes an equivalent base locally first: Debian bookworm minbase + python3 +
# python3-venv from the apt mirror (debootstrap), `docker import`ed, and builds the same Dockerfile with
# --build-arg BASE_IMAGE=<that>. The local base carries this machine's CA bundle and PIP_CERT, so pip
# inside the build trusts what the host trusts (a TLS-inspecting proxy in front of PyPI).
# Needs root (debootstrap, docker) and a running engine (scripts/start-dockerd.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-gpu-exporter:local}"
BASE="${BASE_IMAGE:-python:3.11-slim-bookworm}"
LOCAL_BASE="gpu-exporter-base/debian-python:bookworm"
SMOKE="gpu-exporter-smoke-$$"

make_local_base() {
  command -v debootstrap >/dev/null || apt-get install -y debootstrap >/dev/null
  local root
  root="$(mktemp -d /tmp/gx-base-XXXXXX)"
  echo "build-image: making $LOCAL_BASE with debootstrap in $root"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" http://deb.debian.org/debian \
    >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; rm -rf "$root"; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,info,locale}/*
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$LOCAL_BASE" >/dev/null
  rm -rf "$root" "$root.log"
}

if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! timeout 60 docker pull "$BASE" >/dev/null 2>&1; then
  echo "build-image: cannot pull $BASE; building on a local base instead"
  docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 || make_local_base
  BASE="$LOCAL_BASE"
fi

echo "build-image: docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=$BASE -t $IMAGE ."
docker build --network host -q -f deploy/Dockerfile --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" . >/dev/null
docker image inspect -f 'build-image: {{index .RepoTags 0}}: {{.Size}} bytes, user {{.Config.User}}' "$IMAGE"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cleanup() { docker rm -f "$SMOKE" >/dev/null 2>&1 || true; }
trap cleanup EXIT
sock_gid="$(stat -c %g /var/run/docker.sock)"
docker run -d --name "$SMOKE" --network host --pid host --read-only --tmpfs /tmp \
  --cap-drop ALL --security-opt no-new-privileges \
  -v /var/run/docker.sock:/var/run/docker.sock:ro --group-add "$sock_gid" \
  -e GPU_EXPORTER_LISTEN="127.0.0.1:$port" -e GPU_EXPORTER_SIMULATE=healthy-8gpu -e GPU_EXPORTER_DOCKER=on \
  --health-interval 1s --health-start-period 1s "$IMAGE" >/dev/null

status=""
for _ in $(seq 1 60); do
  status="$(docker inspect -f '{{.State.Health.Status}}' "$SMOKE" 2>/dev/null || echo gone)"
  [ "$status" = healthy ] || [ "$status" = gone ] && break
  sleep 0.5
done
if [ "$status" != healthy ]; then
  echo "build-image: container not healthy (status: $status); its log:" >&2
  docker logs "$SMOKE" 2>&1 | tail -n 30 >&2
  exit 1
fi
metrics="$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=5).read().decode())")"
gpus="$(grep -c '^gpu_up{' <<<"$metrics" || true)"
echo "build-image: $IMAGE healthy; /metrics serves $gpus simulated GPUs as user $(docker exec "$SMOKE" id -u)"
[ "$gpus" -gt 0 ]
