#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs every check: ruff, mypy, the whole pytest suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k nvml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
echo "== ruff"; "$PY" -m ruff check .
echo "== mypy"; "$PY" -m mypy
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code.
"$PY" -m pytest "$@"
