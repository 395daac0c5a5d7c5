"""Regenerate the Python modules for the vendored kubelet PodResources API (``podresources_v1.proto``).

Run from anywhere: ``python3 -m exporter.attribution.kubelet_api.generate [OUT_DIR]``. The generated
``podresources_v1_pb2*.py`` files are committed (the exporter must not need grpcio-tools at run time);
tests/attribution/test_kubelet.py regenerates them into a temporary directory and fails on drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
PROTO = HERE / "podresources_v1.proto"


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for PROTO under ``out_dir`` (same package path)."""
    from grpc_tools import protoc  # the `codegen` extra; never needed by the running exporter

    relative = PROTO.relative_to(REPO_ROOT)
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(relative),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {relative}")
    stem = relative.with_suffix("")
    return [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", out_dir / f"{stem}_pb2_grpc.py"]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT):
        print(path)
