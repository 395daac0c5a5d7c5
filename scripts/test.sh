#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh: Debian packages and the virtualenv .venv) and runs every check
# with .venv's Python: ruff, mypy, the whole pytest suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -k nvml
#   bash scripts/test.sh -m 'not slow'      # the quick tests only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== ruff"; "$PY" -m ruff check .
echo "== mypy"; "$PY" -m mypy
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code.
"$PY" -m pytest "$@"
