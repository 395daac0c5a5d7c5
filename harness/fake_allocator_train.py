"""Runs ``python -m workload.train`` with the hook's CUDA caching-allocator reading made synthetic.

On a CPU-only machine the allocator series (training_cuda_memory_*_bytes) never exist, so the
dashboard live test could not check the panels that show them. This launcher replaces exactly one
function, exporter.hook.cuda.memory_stats, with plausible numbers in its real output shape; the hook's
payload building, the ingest path and the exporter's rendering stay the real ones.
Usage: python -m harness.fake_allocator_train [workload.train arguments...]
"""

from __future__ import annotations

import math
import sys
import time

import exporter.hook.cuda as hook_cuda

GIB = float(1 << 30)
_T0 = time.monotonic()


def fake_memory_stats(device: int | None) -> dict[str, float]:
    """A slowly oscillating allocator footprint of a few GiB, peaks above it, reserved above allocated."""
    t = time.monotonic() - _T0
    allocated = (6 + 2 * math.sin(t / 5)) * GIB
    return {
        "cuda_memory_allocated_bytes": allocated,
        "cuda_memory_reserved_bytes": allocated + 1.5 * GIB,
        "cuda_memory_max_allocated_bytes": 8.5 * GIB,
        "cuda_memory_max_reserved_bytes": 10 * GIB,
        "cuda_alloc_retries": float(int(t // 10)),
        "cuda_oom": 0.0,
    }


hook_cuda.memory_stats = fake_memory_stats

if __name__ == "__main__":
    from workload.train import main

    sys.exit(main(sys.argv[1:]))
