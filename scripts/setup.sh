#!/usr/bin/env bash
# Installs everything the exporter, its tests and the demo need, on Debian 12 or Ubuntu 22.04/24.04:
#  - Debian packages: Prometheus + promtool, Alertmanager + amtool, VictoriaMetrics (fleet store), the
#    Docker engine, busybox-static and debootstrap (test images), python3-venv where the interpreter
#    lacks venv/ensurepip;
#  - a project virtualenv .venv (never the system Python; PEP 668 forbids pip there anyway) holding
#    torch==2.13.0 and this package (editable) with its server, docker, test, dashboards, bench extras.
# Idempotent: a second run installs nothing new. Root or sudo is needed only when a Debian package is
# missing. Installed services are not started (policy-rc.d during the install); nothing running is
# stopped. The Docker engine is started (scripts/start-dockerd.sh) for the container tests.
#
#   PYTHON=python3.12 bash scripts/setup.sh      # the interpreter .venv is made from (default python3)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # PyTorch's CPU build
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"  # pinned: a range pulls a several-GB CUDA build; see README "Installing"
EXTRAS="server,docker,test,dashboards,bench"
STAMP="$VENV/.gpu-exporter-setup"
SUPPORTED="Debian 12, Ubuntu 22.04, Ubuntu 24.04"

step="start"
SUDO=""
POLICY_RC=""
finish() {
  local rc=$?
  if [ -n "$POLICY_RC" ]; then $SUDO rm -f "$POLICY_RC" || true; fi
  if [ "$rc" != 0 ]; then echo "setup: FAILED at step '$step' (exit status $rc)" >&2; fi
}
trap finish EXIT
fail() { echo "setup: $*" >&2; trap - EXIT; exit 1; }

apt_packages=(prometheus prometheus-alertmanager victoria-metrics docker.io busybox-static debootstrap)

step="check the system"
# shellcheck disable=SC1091
os_id="$(. "${SETUP_OS_RELEASE:-/etc/os-release}" 2>/dev/null && echo "${ID:-?} ${VERSION_ID:-?}")" || os_id="unknown"
case "$os_id" in
  "debian 12"|"ubuntu 22.04"|"ubuntu 24.04") ;;
  *)
    if [ "${SETUP_ANY_SYSTEM:-0}" != 1 ]; then
      fail "unsupported system '$os_id' (supported: $SUPPORTED; SETUP_ANY_SYSTEM=1 tries anyway);" \
        "install by hand: ${apt_packages[*]} (Debian's names), then" \
        "'python3 -m venv .venv && .venv/bin/pip install $TORCH -e .[$EXTRAS]'"
    fi ;;
esac
command -v "$PY" >/dev/null || fail "no '$PY' interpreter: install python3 (apt-get install python3) or set PYTHON"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  fail "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); 3.10 to 3.14 are" \
    "supported: set PYTHON to one (e.g. PYTHON=python3.11)"

step="install Debian packages"
# Debian's python3 keeps venv's ensurepip in python3-venv; a python3 that is not the distribution's
# (pyenv, CI) has its own. pip comes into .venv through ensurepip, so python3-pip is never needed.
"$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_packages+=(python3-venv)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null ||
      fail "needs root or sudo to install ${missing[*]}: run it as root, or install them by hand" \
        "(as root: apt-get install --no-install-recommends ${missing[*]}) and run it again"
    SUDO="sudo"
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  # Keep the packaged services (prometheus, alertmanager, ...) from starting during the install: the
  # demo and tests start their own on loopback ports. An existing policy-rc.d (containers have one)
  # is left as it is.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by gpu-exporter scripts/setup.sh for its apt-get install; removed after\nexit 101\n' |
      $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    POLICY_RC=/usr/sbin/policy-rc.d
    $SUDO chmod 755 "$POLICY_RC"
  fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$POLICY_RC" ]; then $SUDO rm -f "$POLICY_RC"; POLICY_RC=""; fi
fi

step="start the Docker engine"
# The container-attribution tests need a running dockerd. Not fatal: without it the tests marked
# docker fail with the reason, and everything else still runs.
bash scripts/start-dockerd.sh || echo "setup: WARNING: no Docker engine; tests marked docker will fail"

step="create the virtualenv $VENV"
if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  echo "setup: creating the virtualenv $VENV from $(command -v "$PY")"
  "$PY" -m venv --clear "$VENV"
fi

step="install $TORCH into $VENV"
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup: installing $TORCH from $TORCH_INDEX_URL"
    "$VENV/bin/python" -m pip install -q --index-url "$TORCH_INDEX_URL" "$TORCH"
  else
    echo "setup: installing $TORCH (from pip's configured index; README 'Installing' says how to pick the CPU build)"
    "$VENV/bin/python" -m pip install -q "$TORCH"
  fi
fi

step="install this package with its extras [$EXTRAS] into $VENV"
want="$(sha256sum <pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  echo "$want" >"$STAMP"
fi
trap - EXIT
echo "setup: done in ${SECONDS} s ($VENV: $("$VENV/bin/python" -c 'import platform, torch; print("Python", platform.python_version(), "torch", torch.__version__)'))"
