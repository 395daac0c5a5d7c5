"""The hook runs inside training processes: importing it must pull in no server dependency, must not
import torch by itself, and must never initialise CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

from harness.support import REPO_ROOT

FORBIDDEN = ["fastapi", "uvicorn", "starlette", "docker", "pynvml", "prometheus_client", "yaml", "pydantic"]


def _run(code: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_pulls_in_only_stdlib() -> None:
    code = (
        "import sys, json\n"
        "import exporter.hook, exporter.hook.lightning, exporter.hook.hf\n"
        "mon = exporter.hook.start(job='t', url='http://127.0.0.1:9')\n"
        "with mon.step(samples=1): pass\n"
        "mon.build_payload()\n"
        f"print(json.dumps({{m: m in sys.modules for m in {[*FORBIDDEN, 'torch', 'lightning', 'transformers']!r}}}))\n"
    )
    loaded = _run(code)
    assert not any(loaded.values()), f"the hook imported: {[m for m, v in loaded.items() if v]}"


def test_hook_never_initialises_cuda() -> None:
    code = (
        "import sys, json, torch\n"
        "import exporter.hook as h\n"
        "mon = h.start(job='t', url='http://127.0.0.1:9')\n"
        "for i in range(3):\n"
        "    with mon.step(samples=2):\n"
        "        loss = torch.ones(()) * i\n"
        "    mon.observe_loss(loss)\n"
        "p = mon.build_payload()\n"
        "print(json.dumps({'cuda_init': torch.cuda.is_initialized(), 'device': p['identity']['device'],"
        " 'torch': p['identity']['torch_version'], 'mem': 'cuda_memory_allocated_bytes' in p['gauges']}))\n"
    )
    result = _run(code)
    assert result["cuda_init"] is False
    assert result["device"] == "cpu" and result["mem"] is False
    assert str(result["torch"]).startswith("2.")
