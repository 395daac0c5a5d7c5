#!/bin/bash
# Runs inside the fresh Debian 12 container of tests/stack/test_fresh_debian.py, as a new user would:
# clone the repository, run the README's first command (the demo), check that it left nothing behind,
# run the README's second command (the checks) on the tests the container can run.
# Each step prints "### step NAME: ok|FAILED (exit N) after S s"; the first failure stops the run.
#   fresh_debian_steps.sh BUNDLE COMMIT PYTEST_MARKERS
set -uo pipefail
BUNDLE="$1" COMMIT="$2" MARKERS="$3"
CLONE=/root/gpu-exporter

step() {  # step NAME CMD...
  local name="$1" start end rc
  shift
  echo "### step $name: start"
  start="$(date +%s.%N)"
  "$@"
  rc=$?
  end="$(date +%s.%N)"
  local took
  took="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$rc" = 0 ]; then echo "### step $name: ok after $took s"; else echo "### step $name: FAILED (exit $rc) after $took s"; exit "$rc"; fi
}

clone() {
  git clone -q "$BUNDLE" "$CLONE" && git -C "$CLONE" -c advice.detachedHead=false checkout -q --detach "$COMMIT" &&
    [ "$(git -C "$CLONE" rev-parse HEAD)" = "$COMMIT" ] && [ -z "$(git -C "$CLONE" status --porcelain)" ]
}

# Processes other than this script, its parents and the lister: the demo must stop everything it
# started, and setup.sh starts no packaged service (the Docker engine is the host's, mounted).
leftovers() {
  python3 - <<'EOF'
import os
mine = {os.getpid(), os.getppid(), 1}
pid = os.getppid()
while pid > 1:  # this script's ancestors (docker's init, the bash running the steps)
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])
    mine.add(pid)
bad = []
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) in mine:
        continue
    try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        continue
    if cmd:
        bad.append(f"{entry} {cmd}")
print("leftover processes:", bad or "none")
tmp = sorted(os.listdir("/tmp"))
print("leftover in /tmp:", tmp or "none")
policy = os.path.exists("/usr/sbin/policy-rc.d")
print("setup.sh's /usr/sbin/policy-rc.d left behind:", policy)
raise SystemExit(1 if bad or tmp or policy else 0)
EOF
}

step clone clone
cd "$CLONE" || exit 1
step demo bash scripts/demo.sh
step cleaned-up leftovers
step test bash scripts/test.sh -p no:cacheprovider -m "$MARKERS"
echo "### all steps passed"
