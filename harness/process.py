"""Process plumbing shared by the benchmark and soak scripts: start the real exporter on a loopback port,
read a process's RSS and open file descriptors from /proc, scrape and parse /metrics.

Standard library (plus prometheus_client's parser) only; the scripts print figures, they never assert.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process in its own session (so a SIGTERM reaches its whole tree), output to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)


def start_exporter(
    log_dir: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None, name: str = "exporter"
) -> tuple[Child, str]:
    """``python -m exporter --listen 127.0.0.1:PORT ARGS...``, returned once /healthz answers.

    E.g. ``start_exporter(d, "--simulate", "healthy-8gpu", "--interval", "0.2")``; (process, base URL).
    """
    port = port or free_port()
    argv = [sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", *args]
    child = Child(name, argv, log_dir, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if not child.alive():
            raise RuntimeError(f"exporter exited early:\n{child.log()}")
        with contextlib.suppress(OSError):
            if request(base, "GET", "/healthz", timeout=1)[0] == 200:
                return child, base
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"exporter did not answer /healthz within 30 s:\n{child.log()}")
        time.sleep(0.1)


def request(
    base: str, method: str, path: str, body: bytes | None = None, timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection; (status, body). Raises OSError when nothing answers."""
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_event(base: str, event: dict[str, Any], timeout: float = 10.0) -> int:
    """Apply one simulator event (POST /-/simulate/events); returns the HTTP status."""
    return request(base, "POST", "/-/simulate/events", json.dumps(event).encode(), timeout,
                   {"Content-Type": "application/json"})[0]


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def counter_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample that must never go down: counters' ``_total`` and summaries' ``_sum``/``_count``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "summary"):
            continue
        for s in family.samples:
            if s.name.endswith(("_total", "_sum", "_count")):
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _status_bytes(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmRSS")


def vm_hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM) of a process so far."""
    return _status_bytes(pid, "VmHWM")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]
