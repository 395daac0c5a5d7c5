"""The latest report of every training process that pushed, until ``--training-ttl`` after it was
last seen; bounded by ``--training-max-processes``, ``--training-max-jobs`` and a series budget: the
series the tracked processes add to /metrics (``TrainingReport.series``), in all
(``--training-max-series``) and per process (``--training-max-series-per-process``).

Thread-safe; every mutation bumps ``generation`` so the training collector can cache its output.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from exporter.config import Settings
from exporter.hook.schema import EXIT_VANISHED, MAX_SERIES_PER_PROCESS
from exporter.ingest.validate import IngestError, TrainingReport

ProcessKey = tuple[str, str, str, int, int | None]


@dataclass(frozen=True, slots=True)
class ProcessGpu:
    """The GPU a training process uses (exporter.attribution.training_diagnosis finds it)."""

    index: str
    uuid: str


@dataclass(frozen=True, slots=True)
class Holder:
    """Another process holding memory on the GPU that ran out."""

    pid: int
    used_memory_bytes: int
    training_job: str
    rank: str
    container: str
    pod: str


@dataclass(frozen=True, slots=True)
class OomRecord:
    """Who else held the GPU when this process's OOM count last rose (kept after the process died)."""

    oom_count: float
    gpu: ProcessGpu
    holders: tuple[Holder, ...]


@dataclass(frozen=True, slots=True)
class TrackedProcess:
    report: TrainingReport
    last_seen: float  # wall clock (Unix seconds) when the exporter last accepted a push
    series: int = 0  # report.series, counted against the budget while tracked
    # issue 16, learned by the exporter (kept across pushes): its GPU, its last OOM's co-tenants, and
    # when its PID was found gone without an exit report
    gpu: ProcessGpu | None = None
    oom: OomRecord | None = None
    vanished_at: float | None = None

    @property
    def learned_series(self) -> int:
        """Series the learned facts add (collectors.training renders exactly these)."""
        n = 1 if self.gpu is not None else 0
        if self.oom is not None:
            n += 1 + len(self.oom.holders)
        return n + (1 if self.report.exit is None and self.vanished_at is not None else 0)

    @property
    def exit(self) -> tuple[str, str, float] | None:
        """How the process ended: its own report, else "vanished" (at its last push), else None."""
        if self.report.exit is not None:
            return self.report.exit
        if self.vanished_at is not None:
            return (EXIT_VANISHED, "", self.last_seen)
        return None


class IngestStore:
    """Latest report per training process, expired ``ttl`` seconds after it was last seen.

    Thread-safe; every mutation bumps ``generation`` so a renderer can cache its output.
    """

    def __init__(
        self,
        ttl_seconds: float = Settings.training_ttl,
        max_processes: int = Settings.training_max_processes,
        clock: Callable[[], float] = time.time,
        max_jobs: int = Settings.training_max_jobs,
        max_series: int = Settings.training_max_series,
        max_series_per_process: int | None = Settings.training_max_series_per_process,
    ) -> None:
        self.ttl_seconds = float(ttl_seconds)
        self.max_processes = int(max_processes)
        self.max_jobs = int(max_jobs)
        # Per process, the default is the most one valid push can produce.
        self.max_series = int(max_series)
        self.max_series_per_process = int(max_series_per_process or MAX_SERIES_PER_PROCESS)
        self.series = 0  # series the tracked processes add now (sum of TrackedProcess.series)
        self._clock = clock
        self._lock = threading.Lock()
        self._processes: dict[tuple[str, str, str, int, int | None], TrackedProcess] = {}
        self._requests: dict[str, int] = {"accepted": 0, "rejected": 0}
        self._rejected: dict[str, int] = {}
        self.generation = 0

    # ------------------------------------------------------------------ writes
    def submit(self, report: TrainingReport) -> str:
        """Store a validated report. Returns "accepted", or "stale" for a reordered older push.

        Raises IngestError (429) when a new process would exceed ``max_processes`` / ``max_jobs``
        ("cardinality") or the push would exceed the series budget ("series_budget"); a refused push
        changes nothing: the process's last accepted report stays.
        """
        now = self._clock()
        key = report.process_key
        cost = report.series
        with self._lock:
            self._expire_locked(now)
            old = self._processes.get(key)
            if old is not None:
                o = old.report
                if report.process_start_time < o.process_start_time or (
                    report.process_start_time == o.process_start_time and report.seq <= o.seq
                ):
                    self._requests["accepted"] += 1
                    self.generation += 1
                    return "stale"
            elif len(self._processes) >= self.max_processes:
                self._count_rejected_locked("cardinality")
                raise IngestError(
                    "cardinality",
                    f"already tracking {self.max_processes} training processes (--training-max-processes)",
                    429,
                )
            elif self._job_limit_reached_locked(report.training_job):
                self._count_rejected_locked("cardinality")
                raise IngestError(
                    "cardinality", f"already tracking {self.max_jobs} training jobs (--training-max-jobs)", 429
                )
            if cost > self.max_series_per_process:
                self._count_rejected_locked("series_budget")
                raise IngestError(
                    "series_budget",
                    f"this push would add {cost} series; a process may add {self.max_series_per_process} "
                    "(--training-max-series-per-process)",
                    429,
                )
            in_use = self.series - (old.series if old is not None else 0)
            if in_use + cost > self.max_series:
                self._count_rejected_locked("series_budget")
                raise IngestError(
                    "series_budget",
                    f"this push would add {cost} series to the {in_use} in use; the budget is "
                    f"{self.max_series} (--training-max-series)",
                    429,
                )
            # What the exporter learned (issue 16) stays with the process and in the series in use.
            kept = (old.gpu, old.oom) if old is not None else (None, None)
            tracked = TrackedProcess(report, now, cost, *kept)
            tracked = dataclasses.replace(tracked, series=cost + tracked.learned_series)
            self._processes[key] = tracked
            self.series = in_use + tracked.series
            self._requests["accepted"] += 1
            self.generation += 1
            return "accepted"

    def _job_limit_reached_locked(self, job: str) -> bool:
        """Would a new process of ``job`` add one distinct job too many? (Only new processes ask.)"""
        if len(self._processes) < self.max_jobs:  # fewer processes than the limit: fewer jobs too
            return False
        jobs = {k[1] for k in self._processes}
        return job not in jobs and len(jobs) >= self.max_jobs

    def count_rejected(self, reason: str) -> None:
        """Count a refused push (the router calls this; so may auth / rate-limit dependencies)."""
        with self._lock:
            self._count_rejected_locked(reason)

    def _count_rejected_locked(self, reason: str) -> None:
        self._requests["rejected"] += 1
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self.generation += 1

    def expire(self) -> None:
        with self._lock:
            self._expire_locked(self._clock())

    def _expire_locked(self, now: float) -> None:
        cutoff = now - self.ttl_seconds
        dead = [k for k, p in self._processes.items() if p.last_seen < cutoff]
        for k in dead:
            self.series -= self._processes.pop(k).series
        if dead:
            self.generation += 1

    def learn(self, key: ProcessKey, **facts: object) -> None:
        """Attach what the exporter learned about a tracked process (``gpu``, ``oom``, ``vanished_at``;
        issue 16). A process no longer tracked is ignored."""
        with self._lock:
            p = self._processes.get(key)
            if p is not None:
                new = dataclasses.replace(p, **facts)  # type: ignore[arg-type]
                if new != p:
                    new = dataclasses.replace(new, series=p.series - p.learned_series + new.learned_series)
                    self.series += new.series - p.series
                    self._processes[key] = new
                    self.generation += 1

    # ------------------------------------------------------------------ reads
    def processes(self) -> list[TrackedProcess]:
        """Live processes (expired ones dropped first), oldest first."""
        with self._lock:
            self._expire_locked(self._clock())
            return sorted(self._processes.values(), key=lambda p: p.last_seen)

    def stats(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(requests by outcome, rejections by reason, processes tracked) for self-metrics."""
        with self._lock:
            return dict(self._requests), dict(self._rejected), len(self._processes)
