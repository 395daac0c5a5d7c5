"""The live alert path for tests and benchmarks/time_to_notify.py: a webhook receiver that records
Alertmanager's notifications, and the shipped fast-profile Prometheus and Alertmanager configs pointed
at a test's own ports.

Why shared: the end-to-end tests, the live inhibition test and the time-to-notify benchmark must run
exactly the shipped rules and routing (alerts/fast/, alerts/alertmanager-fast.yml), only with the
addresses rewritten, so what they check and measure is what users deploy.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness.support import (
    REPO_ROOT,
    WORKLOAD_ENV,
    ManagedProcess,
    start_alertmanager,
    start_exporter,
    start_prometheus,
)

ALERTS_DIR = REPO_ROOT / "alerts"
# The address the shipped configs send webhooks to (the demo's receiver); tests replace it.
SHIPPED_WEBHOOK = "http://127.0.0.1:9099"
# Prometheus flags of the fast profile (see alerts/prometheus-fast.yml): resend firing alerts every
# second instead of every minute, so an alert evaluated before Prometheus has discovered Alertmanager
# (the first seconds after start) is not held back for a minute.
PROMETHEUS_FAST_ARGS = ("--rules.alert.resend-delay=1s",)


@dataclass(frozen=True)
class Notification:
    """One webhook call from Alertmanager: the receiver path (/page, /ticket, ...), body, arrival time."""

    path: str
    body: dict[str, Any]
    received_wall: float
    received_monotonic: float

    @property
    def status(self) -> str:
        return str(self.body.get("status"))

    def alerts(self, status: str | None = None) -> list[dict[str, Any]]:
        """The alerts in this notification (optionally only firing/resolved ones)."""
        out = list(self.body.get("alerts") or [])
        return [a for a in out if status is None or a.get("status") == status]


class WebhookReceiver:
    """Records every POST Alertmanager makes; tests wait on conditions over what arrived."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._seen: list[Notification] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparsable": raw.decode(errors="replace")}
                note = Notification(self.path, body, time.time(), time.monotonic())
                with receiver._lock:
                    receiver._seen.append(note)
                    receiver._lock.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="webhook", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self._seen)

    def wait_for_alert(
        self,
        match: Callable[[dict[str, Any]], bool],
        status: str = "firing",
        timeout: float = 60.0,
        since: float = 0.0,
    ) -> tuple[Notification, dict[str, Any]]:
        """The first notification (arrived after monotonic ``since``) carrying an alert with that
        status for which ``match(alert)`` holds; AssertionError with everything seen on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for note in self._seen:
                    if note.received_monotonic < since:
                        continue
                    for alert in note.alerts(status):
                        if match(alert):
                            return note, alert
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(n.path, [(a["labels"].get("alertname"), a["status"]) for a in n.alerts()])
                            for n in self._seen]
                    raise AssertionError(f"no {status} notification matched within {timeout:.0f}s; seen: {seen}")
                self._lock.wait(min(left, 0.5))


def labels_match(**want: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate for wait_for_alert: the alert's labels include all of ``want``."""

    def match(alert: dict[str, Any]) -> bool:
        labels = alert.get("labels") or {}
        return all(labels.get(k) == v for k, v in want.items())

    return match


def alertmanager_config(webhook_url: str, profile: str = "fast") -> str:
    """The shipped Alertmanager config of ``profile`` with its webhooks sent to ``webhook_url``."""
    name = "alertmanager-fast.yml" if profile == "fast" else "alertmanager.yml"
    text = (ALERTS_DIR / name).read_text()
    assert SHIPPED_WEBHOOK in text, f"{name} no longer posts to {SHIPPED_WEBHOOK}; update alert_stack.py"
    return text.replace(SHIPPED_WEBHOOK, webhook_url.rstrip("/"))


def prometheus_config(exporter: str, alertmanager: str) -> str:
    """alerts/prometheus-fast.yml with its placeholders filled (``host:port`` addresses)."""
    text = (ALERTS_DIR / "prometheus-fast.yml").read_text()
    return (
        text.replace("__ALERTS_DIR__", str(ALERTS_DIR))
        .replace("__EXPORTER__", f"'{exporter}'")
        .replace("__ALERTMANAGER__", f"'{alertmanager}'")
    )


def _hostport(base: str) -> str:
    return base.split("://", 1)[1].rstrip("/")


@dataclass
class AlertStack:
    """A running exporter → Prometheus (fast rules) → Alertmanager (fast config) → webhook chain."""

    exporter: ManagedProcess
    exporter_url: str
    prometheus: ManagedProcess
    prometheus_url: str
    alertmanager: ManagedProcess
    alertmanager_url: str
    webhook: WebhookReceiver
    processes: list[ManagedProcess] = field(default_factory=list)


def start_workload(stack: AlertStack, job: str, *args: str) -> ManagedProcess:
    """A small sample training job (CPU, hook pushing every 0.25 s) reporting to the stack's exporter;
    ``args`` adds e.g. ``--fault oom@20``. Stopped with the stack, if not before."""
    argv = [
        sys.executable, "-m", "workload.train", "--device", "cpu", "--job", job,
        "--exporter-url", stack.exporter_url, "--push-interval", "0.25", "--log-every", "0",
        "--steps", "0", "--duration", "120", "--batch-size", "4", "--image-size", "16", "--width", "8",
        "--step-delay", "0.05", *args,
    ]  # fmt: skip
    proc = ManagedProcess(f"train-{job}", argv, stack.exporter.log_path.parent, env=WORKLOAD_ENV)
    stack.processes.append(proc)
    return proc


@contextlib.contextmanager
def alert_stack(log_dir: Path, exporter_args: Sequence[str]) -> Iterator[AlertStack]:
    """Start the whole chain (webhook, Alertmanager, exporter, Prometheus); stop it all on exit."""
    webhook = WebhookReceiver().start()
    started: list[ManagedProcess] = []
    try:
        am_cfg = log_dir / "alertmanager.yml"
        am_cfg.write_text(alertmanager_config(webhook.url))
        am, am_url = start_alertmanager(log_dir, am_cfg)
        started.append(am)
        exp, exp_url = start_exporter(log_dir, *exporter_args)
        started.append(exp)
        prom, prom_url = start_prometheus(
            log_dir, prometheus_config(_hostport(exp_url), _hostport(am_url)), extra_args=PROMETHEUS_FAST_ARGS
        )
        started.append(prom)
        # The always-firing watchdog reaching the webhook proves the whole path is connected.
        webhook.wait_for_alert(labels_match(alertname="GpuWatchdog"), timeout=30)
        yield AlertStack(exp, exp_url, prom, prom_url, am, am_url, webhook, started)
    finally:
        for proc in reversed(started):
            proc.stop()
        webhook.stop()
