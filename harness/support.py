"""Helpers tests and benchmarks share: free ports, condition polling, and real child processes
(the exporter, Prometheus, Alertmanager) started on loopback and stopped afterwards."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from harness.process import REPO_ROOT as REPO_ROOT
from harness.process import Child as ManagedProcess
from harness.process import free_port as free_port
from harness.process import parse_metrics as parse_metrics
from harness.process import start_exporter as start_exporter

T = TypeVar("T")

# For sample training processes: one thread each, so several share 2 cores without starving the rest.
WORKLOAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; return that value or fail with a message.

    Exceptions raised by the condition count as "not yet" (a server still starting refuses
    connections); the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {message}; last error: {last_error!r}"
            )
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET a URL; return (status, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(base: str, timeout: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET ``base``/metrics (must answer 200) and parse it: {sample_name: [(labels, value), ...]}."""
    status, body = http_get(base + "/metrics", timeout=timeout)
    assert status == 200, body
    return parse_metrics(body)


def http_post_json(
    url: str, payload: Any, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed; .ci/run installs it (apt-get install ...)")
    return path


def wait_ready(proc: ManagedProcess, base: str, what: str, timeout: float = 60) -> None:
    """Wait until ``base``/-/ready answers 200 (Prometheus, Alertmanager); stop ``proc`` and fail with its
    log if it exits or the deadline passes first."""

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{what} exited early:\n{proc.log()}")
        return http_get(base + "/-/ready", timeout=1)[0] == 200

    try:
        wait_until(ready, timeout=timeout, message=f"{what} ready")
    except BaseException:
        proc.stop()
        raise


def start_prometheus(
    log_dir: Path, config_yaml: str, port: int | None = None, extra_args: Sequence[str] = ()
) -> tuple[ManagedProcess, str]:
    """Start the real Prometheus (Debian package) with ``config_yaml`` on a loopback port."""
    binary = require_binary("prometheus")
    port = port or free_port()
    cfg = log_dir / "prometheus.yml"
    cfg.write_text(config_yaml)
    data = log_dir / "prometheus-data"
    data.mkdir(exist_ok=True)
    proc = ManagedProcess(
        "prometheus",
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            *extra_args,
        ],
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "prometheus")
    return proc, base


def start_alertmanager(
    log_dir: Path, config_path: Path, port: int | None = None
) -> tuple[ManagedProcess, str]:
    """Start the real Alertmanager (Debian ``prometheus-alertmanager``) on a loopback port."""
    binary = shutil.which("prometheus-alertmanager") or require_binary("alertmanager")
    port = port or free_port()
    data = log_dir / "alertmanager-data"
    data.mkdir(exist_ok=True)
    proc = ManagedProcess(
        "alertmanager",
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "alertmanager")
    return proc, base


def prom_query(base: str, promql: str) -> list[dict[str, Any]]:
    """Instant query through Prometheus's HTTP API; returns the result vector."""
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = http_get(url)
    if status != 200:
        raise AssertionError(f"query {promql!r} failed with {status}: {body}")
    return list(json.loads(body)["data"]["result"])




def documented_metric_names() -> set[str]:
    """Metric names in docs/metrics.md's metric tables (those headed ``| name |``; not the label tables),
    with the ``/ `_free_bytes``` shorthand of a row expanded."""
    names: set[str] = set()
    in_metric_table = False
    for line in (REPO_ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("|"):
            in_metric_table = False
            continue
        if line.startswith("| name |"):
            in_metric_table = True
        if not (in_metric_table and line.startswith("| `")):
            continue
        tokens = re.findall(r"`([a-z_]+)`", line.split("|")[1])
        base = tokens[0]
        names.add(base)
        for short in tokens[1:]:
            if short.startswith("_"):
                parts = short.strip("_").split("_")
                names.add("_".join(base.split("_")[: -len(parts)] + parts))
            else:
                names.add(short)
    return names
