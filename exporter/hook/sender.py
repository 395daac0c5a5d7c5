"""Background delivery of the recorder's cumulative snapshots to the exporter.

One daemon thread per process. It builds a payload, POSTs it with a short timeout, and on failure
backs off exponentially (capped). It logs once per outage that the exporter cannot be reached and
once when it can again. Because every push is cumulative, a push that is lost costs nothing but
freshness; training code is never blocked or raised into.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import urllib.error
import urllib.request
from typing import Any

from exporter.hook.env import TOKEN_ENV, TOKEN_FILE_ENV
from exporter.hook.monitor import Monitor
from exporter.hook.schema import INGEST_PATH

log = logging.getLogger("exporter.hook")

MAX_BACKOFF_SECONDS = 30.0


def _read_token() -> str | None:
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError:
            return None
    return None


class Sender:
    """Pushes ``monitor.build_payload()`` to ``url`` every ``interval`` seconds until stopped."""

    def __init__(self, monitor: Monitor, url: str, interval: float = 1.0, timeout: float = 2.0) -> None:
        self.monitor = monitor
        self.url = url.rstrip("/") + INGEST_PATH
        self.interval = max(0.05, float(interval))
        self.timeout = timeout
        self.pushes_ok = 0
        self.pushes_failed = 0
        self._failures_in_row = 0
        self._reachable: bool | None = None
        self._reported_rejection = False
        self._stop = threading.Event()
        # Loopback / sidecar target: never route through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="gpu-exporter-hook-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = True, flush_timeout: float = 1.0) -> None:
        """Stop the thread; with ``flush``, push the final counters once more (bounded).

        After an outage the exporter may be back while the thread was still backing off, so the
        final push is tried then too, with a short timeout (a refused loopback connection fails at
        once, so an absent exporter costs the job's exit nothing measurable).
        """
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=flush_timeout + self.timeout)
        if flush:
            self.push_once(timeout=flush_timeout if self._reachable is not False else min(flush_timeout, 0.25))

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = self.push_once()
            if ok:
                delay = self.interval
            else:
                exp = min(self._failures_in_row, 10)
                delay = min(MAX_BACKOFF_SECONDS, self.interval * (2**exp)) * random.uniform(0.8, 1.2)
            self._stop.wait(delay)

    def push_once(self, timeout: float | None = None) -> bool:
        """Build and POST one snapshot; True on success. Never raises."""
        if self.monitor._silent:
            return True
        try:
            body = json.dumps(self.monitor.build_payload()).encode("utf-8")
        except Exception as exc:
            self._log_once_rejected(f"could not build the payload: {exc!r}")
            return False
        headers = {"Content-Type": "application/json"}
        token = _read_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                resp.read()
            self._delivered()
            return True
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if 400 <= err.code < 500 and err.code not in (408, 429):
                # The exporter answered but refused: retrying the same thing faster will not help.
                self._mark_reachable()
                self._log_once_rejected(f"exporter at {self.url} refused the push ({err.code}): {detail}")
            else:
                self._unreachable(f"HTTP {err.code} {detail}")
        except Exception as exc:  # connection refused, timeout, DNS, anything
            self._unreachable(repr(exc))
        self.pushes_failed += 1
        self._failures_in_row += 1
        return False

    def _delivered(self) -> None:
        self.pushes_ok += 1
        self._failures_in_row = 0
        if self._reachable is False:
            log.info("gpu-exporter hook: reaching the exporter at %s again", self.url)
        self._reachable = True
        self._reported_rejection = False

    def _mark_reachable(self) -> None:
        self._reachable = True

    def _unreachable(self, why: str) -> None:
        if self._reachable is not False:
            log.warning(
                "gpu-exporter hook: cannot reach the exporter at %s (%s); training continues, "
                "the hook keeps the latest state and retries with backoff quietly",
                self.url,
                why,
            )
        self._reachable = False

    def _log_once_rejected(self, message: str) -> None:
        if not self._reported_rejection:
            self._reported_rejection = True
            log.warning("gpu-exporter hook: %s", message)


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        data: Any = err.read(500)
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    except Exception:
        return ""
