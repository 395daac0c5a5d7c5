"""Background delivery of the recorder's cumulative snapshots to the exporter.

One daemon thread per process. It builds a payload, POSTs it with a short timeout, and on failure
backs off exponentially (capped). It logs once per outage that the exporter cannot be reached and
once when it can again. Because every push is cumulative, a push that is lost costs nothing but
freshness; training code is never blocked or raised into.

A push the exporter refuses as invalid (4xx, e.g. a newer hook's field an older exporter does not
know) or as over its series budget (429 ``series_budget``) is logged once, and the next pushes carry
only the core fields every exporter takes (schema.CORE_KEYS, no per-service
sections) so the job's steps, losses and OOMs keep arriving; the full push is tried again every
``FULL_RETRY_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from exporter.hook.env import TOKEN_ENV, TOKEN_FILE_ENV
from exporter.hook.monitor import Monitor
from exporter.hook.schema import CORE_KEYS, INGEST_PATH

log = logging.getLogger("exporter.hook")

MAX_BACKOFF_SECONDS = 30.0
FULL_RETRY_SECONDS = 60.0
_CORE_KEYS = ("schema", "seq", "process_start_time", "identity")


def core_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a push every exporter since schema 1 accepts (see the module docstring)."""
    out = {k: payload[k] for k in _CORE_KEYS if k in payload}
    out["counters"] = {k: v for k, v in payload.get("counters", {}).items() if k in CORE_KEYS}
    out["gauges"] = {k: v for k, v in payload.get("gauges", {}).items() if k in CORE_KEYS}
    return out


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
        self._core_until = 0.0  # monotonic time until which pushes carry the core fields only
        self._stop = threading.Event()
        # Loopback / sidecar target: never route through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="gpu-exporter-hook-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = True, flush_timeout: float = 1.0) -> None:
        """Stop the thread; with ``flush``, push the final counters once more. Returns within
        ``flush_timeout`` seconds whatever the exporter does (a push still running then, e.g. against
        a server that trickles its answer, is left to its daemon thread).

        After an outage the exporter may be back while the thread was still backing off, so the
        final push is tried then too (a refused loopback connection fails at once).
        """
        deadline = time.monotonic() + flush_timeout
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=flush_timeout)
        left = deadline - time.monotonic()
        if not flush or left <= 0.01 or self._thread.is_alive():
            return  # no time left, or the last push is still in flight (it carries nearly the same)
        timeout = left if self._reachable is not False else min(left, 0.25)
        final = threading.Thread(
            target=self.push_once, kwargs={"timeout": timeout}, name="gpu-exporter-hook-flush", daemon=True
        )
        final.start()
        final.join(timeout=left)

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
        core = time.monotonic() < self._core_until
        try:
            payload = self.monitor.build_payload()
            body = json.dumps(core_payload(payload) if core else payload).encode("utf-8")
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
            self._delivered(full=not core)
            return True
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            budget = err.code == 429 and '"series_budget"' in detail
            if (400 <= err.code < 500 and err.code not in (408, 429)) or budget:
                # The exporter answered but refused this push: send what every exporter takes from now
                # on (full pushes are retried every FULL_RETRY_SECONDS), so the job never goes quiet.
                self._mark_reachable()
                what = "the core fields" if core else "only the core fields for now"
                self._log_once_rejected(
                    f"exporter at {self.url} refused the push ({err.code}): {detail}; sending {what}"
                )
                if not core:
                    self._core_until = time.monotonic() + FULL_RETRY_SECONDS
                    self.pushes_failed += 1
                    return True  # not an outage: push the core fields at the next interval
            else:
                self._unreachable(f"HTTP {err.code} {detail}")
        except Exception as exc:  # connection refused, timeout, DNS, anything
            self._unreachable(repr(exc))
        self.pushes_failed += 1
        self._failures_in_row += 1
        return False

    def _delivered(self, full: bool = True) -> None:
        self.pushes_ok += 1
        self._failures_in_row = 0
        if self._reachable is False:
            log.info("gpu-exporter hook: reaching the exporter at %s again", self.url)
        self._reachable = True
        if full:
            if self._reported_rejection:
                log.info("gpu-exporter hook: the exporter accepts full pushes again")
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
