"""Background polling, decoupled from scraping.

One daemon thread reads the node (``reader.read()``, NVML underneath), runs the enrichers (container
attribution, training join) and then swaps the new ``NodeSnapshot`` in with a single reference
assignment. Scrapes only ever read ``Poller.latest``: a slow or hung NVML call delays the next snapshot
(visible as ``gpu_exporter_snapshot_age_seconds``) but never a scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from exporter.snapshot import NodeSnapshot

log = logging.getLogger(__name__)

Enricher = Callable[[NodeSnapshot], NodeSnapshot]
SnapshotListener = Callable[[NodeSnapshot], None]


class Reader(Protocol):
    """What the poller needs from ``exporter.nvml.NvmlReader`` (tests pass their own)."""

    def read(self) -> NodeSnapshot: ...


@dataclass
class PollStats:
    """Counters for the exporter's self-metrics; written only by the poller thread."""

    polls_total: int = 0
    errors_total: dict[str, int] = field(default_factory=dict)
    last_duration_seconds: float | None = None
    last_success_timestamp_seconds: float | None = None
    # Poll start (monotonic) while a poll is in progress, else None: shows a hung poll on /status.
    in_progress_since: float | None = None

    def count_error(self, kind: str) -> None:
        self.errors_total[kind] = self.errors_total.get(kind, 0) + 1


class Poller:
    """Polls ``reader`` every ``interval_seconds`` on a background thread.

    ``latest`` is the newest snapshot (None before the first poll finished); ``generation`` grows by one
    with every new snapshot, so renderers can cache their output per generation.
    """

    def __init__(
        self,
        reader: Reader,
        interval_seconds: float,
        enrichers: Sequence[Enricher] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be > 0")
        self.reader = reader
        self.interval_seconds = interval_seconds
        self.enrichers = list(enrichers)
        self.stats = PollStats()
        self.latest: NodeSnapshot | None = None
        self.generation = 0
        self._clock = clock
        self._listeners: list[SnapshotListener] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None

    def add_listener(self, listener: SnapshotListener) -> None:
        """Call ``listener(snapshot)`` on the poller thread after each new snapshot (e.g. pre-rendering)."""
        self._listeners.append(listener)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop; return False when a poll stuck in NVML had to be abandoned after ``timeout``
        (the thread is a daemon, so it cannot keep the process alive)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("poller did not stop within %.1fs (a poll is stuck); leaving it", timeout)
                return False
        return True

    def poll_now(self) -> None:
        """Start the next poll without waiting for the interval (e.g. after a simulated event)."""
        self._wake.set()

    def wait_first(self, timeout: float | None = None) -> bool:
        return self._first.wait(timeout)

    def poll_once(self) -> NodeSnapshot:
        """One poll cycle: read, enrich, publish. Never raises; errors are logged and counted."""
        started = time.monotonic()
        self.stats.in_progress_since = started
        try:
            snapshot = self.reader.read()
        except Exception:  # the reader promises not to raise; keep serving if it does
            log.exception("reader.read() raised; keeping the previous snapshot")
            self.stats.count_error("unknown")
            self._finish(started)
            return self.latest or NodeSnapshot(host="", timestamp_seconds=self._clock(), nvml_up=False)
        for enrich in self.enrichers:
            try:
                snapshot = enrich(snapshot)
            except Exception:
                log.exception("enricher %s failed; serving the snapshot without it", _name(enrich))
                self.stats.count_error("enricher")
        self._count_snapshot_errors(snapshot)
        self.latest = snapshot  # the atomic swap: one reference assignment
        self.generation += 1
        self.stats.last_success_timestamp_seconds = self._clock()
        self._finish(started)
        self._first.set()
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot listener %s failed", _name(listener))
        return snapshot

    def _finish(self, started: float) -> None:
        self.stats.polls_total += 1
        self.stats.last_duration_seconds = time.monotonic() - started
        self.stats.in_progress_since = None

    def _count_snapshot_errors(self, snapshot: NodeSnapshot) -> None:
        if not snapshot.nvml_up:
            self.stats.count_error("nvml_init")
        for gpu in snapshot.gpus:
            if not gpu.up:
                self.stats.count_error(gpu.error or "unknown")

    def _run(self) -> None:
        log.debug("poller started, interval %.3fs", self.interval_seconds)
        while not self._stop.is_set():
            started = time.monotonic()
            self._wake.clear()
            self.poll_once()
            remaining = self.interval_seconds - (time.monotonic() - started)
            if remaining > 0:
                self._wake.wait(remaining)
        log.debug("poller stopped")


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
