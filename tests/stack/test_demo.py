"""scripts/demo.sh, the README's main command, runs to the end: the page arrives and it cleans up.

Run with --no-setup (CI has already run scripts/setup.sh) on free ports, so it can run beside
anything else on the machine, with this test's Python (DEMO_PYTHON; the demo's default is .venv's).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.support import REPO_ROOT, free_port, require_binary

pytestmark = pytest.mark.slow


def test_demo_delivers_the_page_and_cleans_up(tmp_path: Path) -> None:
    require_binary("prometheus")
    ports = {name: str(free_port()) for name in ("EXPORTER", "PROMETHEUS", "ALERTMANAGER", "WEBHOOK")}
    env = {**os.environ, "TMPDIR": str(tmp_path), "DEMO_TIMEOUT": "60", "DEMO_PYTHON": sys.executable, **{f"DEMO_{k}_PORT": v for k, v in ports.items()}}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--no-setup"],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "FIRING GpuWatchdog" in out
    assert "/page FIRING GpuLost severity=critical" in out and "gpu=5" in out, out
    assert "/page RESOLVED GpuLost" in out, out
    assert f"http://127.0.0.1:{ports['PROMETHEUS']}/alerts" in out
    # The trap removed its work folder, with every temporary file of the stack (TMPDIR pointed into
    # it), and stopped every process it started (their ports are free).
    assert not list(tmp_path.iterdir()), out
    for port in ports.values():
        with socket.socket() as s:  # bind fails while anything still listens there (TIME_WAIT is fine)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(port)))


def test_demo_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "DEMO_PYTHON": sys.executable, "DEMO_WEBHOOK_PORT": str(busy.getsockname()[1])}
        result = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--no-setup"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )
    assert result.returncode == 1 and "DEMO_WEBHOOK_PORT" in result.stderr, result.stdout + result.stderr
