"""XID errors, pushed by NVML's event API rather than polled: a daemon thread per reader blocks in
``nvmlEventSetWait_v2`` and counts events per GPU UUID and XID code, with a last-seen time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.nvml.fields import device_address
from exporter.snapshot import XidCount

log = logging.getLogger(__name__)


class XidListener:
    """Counts XID errors from NVML's event API on a background thread, per GPU UUID and XID code.

    It holds its own NVML reference (nvmlInit is reference-counted) so it lives through the reader's
    re-inits. When the reader reports a different set of answering GPUs (one vanished, returned or
    recovered) every GPU is registered again on the same event set; when NVML fails, the thread starts
    a new NVML session with backoff. The UUID of each registered handle is remembered at registration:
    after XID 79 the GPU cannot tell it anymore.
    """

    MAX_RETRY_SECONDS = 30.0

    WAIT_MS = 250  # bounds how long close() waits for the thread

    def __init__(self, retry_seconds: float = 1.0, wall_clock: Callable[[], float] = time.time) -> None:
        self._retry_seconds = retry_seconds
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, XidCount]] = {}
        self._wanted: frozenset[str] = frozenset()
        self.registered: frozenset[str] = frozenset()  # GPUs whose XIDs are being received now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # NVML sessions failed in a row (backoff)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvml-xid-listener", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def want(self, uuids: frozenset[str]) -> None:
        """The GPUs that answered the last poll; a change makes the thread re-register."""
        self._wanted = uuids

    def counts(self, uuid: str) -> dict[int, XidCount]:
        with self._lock:
            return dict(self._counts.get(uuid, {}))

    def record(self, uuid: str, xid: int) -> None:
        with self._lock:
            per_gpu = self._counts.setdefault(uuid, {})
            previous = per_gpu.get(xid)
            per_gpu[xid] = XidCount((previous.count if previous else 0) + 1, self._wall_clock())
        log.warning("XID %d on GPU %s", xid, uuid)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                self._backoff(f"nvmlInit failed ({exc})")
                continue
            try:
                self._listen()
            except pynvml.NVMLError as exc:
                self._backoff(f"NVML error ({exc})")
            except Exception:
                log.exception("XID listener failed; restarting it")
                self._backoff("unexpected error")
            finally:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def _backoff(self, why: str) -> None:
        """Wait before the next NVML session, longer each time it keeps failing (no log flood when
        there is no driver, or the platform has no event API); logged once per outage."""
        self._failures += 1
        delay = min(self.MAX_RETRY_SECONDS, self._retry_seconds * 2 ** (self._failures - 1))
        log.log(logging.INFO if self._failures == 1 else logging.DEBUG,
                "XID listener: %s; retrying in %.2gs", why, delay)
        self._stop.wait(delay)

    def _listen(self) -> None:
        """One event set per NVML session: register every reachable GPU, wait for events, and register
        again (on the same set, so no event is missed meanwhile) whenever the set of GPUs changes."""
        event_set = pynvml.nvmlEventSetCreate()
        try:
            uuids: dict[int, str] = {}
            while not self._stop.is_set():
                wanted = self._wanted
                self.registered = self._register(event_set, uuids)
                self._failures = 0
                while not self._stop.is_set() and self._wanted == wanted:
                    try:
                        data = pynvml.nvmlEventSetWait_v2(event_set, self.WAIT_MS)
                    except pynvml.NVMLError_Timeout:
                        continue
                    if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                        self.record(uuids.get(device_address(data.device), "unknown"), int(data.eventData))
        finally:
            self.registered = frozenset()
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(event_set)

    @staticmethod
    def _register(event_set: Any, uuids: dict[int, str]) -> frozenset[str]:
        """Register XID events of every GPU that answers; remember each handle's UUID. Returns the
        UUIDs registered now."""
        registered = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
            except pynvml.NVMLError as exc:
                log.debug("XID listener: GPU %d not registered (%s)", i, exc)
                continue
            uuids[device_address(handle)] = uuid
            registered.add(uuid)
        return frozenset(registered)
