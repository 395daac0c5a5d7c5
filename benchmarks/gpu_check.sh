#!/usr/bin/env bash
# GPU checks for a machine with a real NVIDIA GPU (issue "Verify on a real GPU"); CI never runs this.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Through the device tool (wheels travel in the ignored .whl/ folder):
#   cp -r ../shared/wheels-gpu-py312 .whl
#   device run --carry .whl -- 'bash benchmarks/gpu_check.sh'
#
# It installs the server's Python dependencies from .whl/ when that folder is there (no index is
# reachable from the GPU machine; torch must already be installed), then runs python -m benchmarks.gpu_check,
# which prints a report and writes it as JSON to $OUT/gpu_check.json (or /tmp/gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --find-links .whl \
    fastapi uvicorn prometheus-client nvidia-ml-py pyyaml httpx docker nvitop-exporter 2>&1 | tail -n 3 || true
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
nvidia-smi -L || true

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir=${OUT:-/tmp/gpu-check}
mkdir -p "$out_dir"
exec "$PY" -m benchmarks.gpu_check --out "$out_dir/gpu_check.json" "$@"
