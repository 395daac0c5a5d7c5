"""Receiving the training hook's pushes: validation, the per-process store, TTL expiry, the PID join.

The hook (exporter.hook) POSTs cumulative snapshots to ``/api/v1/training``. This module checks them
strictly (size, schema, cardinality; a bad push gets a 4xx naming the offending field and never
touches the store), keeps the latest report per training process for ``ttl`` seconds after it was
last seen, and offers an enricher that labels NVML's per-process GPU memory with the job and rank
that own the PID, across PID namespaces (containers) via /proc/<pid>/status ``NSpid``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from exporter.hook.schema import (
    COUNTERS,
    GAUGES,
    IDENTITY_STR_KEYS,
    INGEST_PATH,
    MAX_BODY_BYTES,
    MAX_LABEL_LENGTH,
    MAX_SERVICES,
    NONFINITE_ALLOWED,
    SCHEMA_VERSION,
)
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 300.0
DEFAULT_MAX_PROCESSES = 1024
# Distinct training_job values tracked at once. With the process limit and the per-push limits
# (MAX_LABEL_LENGTH, MAX_SERVICES) this bounds every training_* family's label sets.
DEFAULT_MAX_JOBS = 64
_TOP_KEYS = frozenset(
    {"schema", "seq", "process_start_time", "sent_at", "identity", "counters", "gauges"}
    | {"auth_failures", "token_expiry", "api_quota"}
)


class IngestError(Exception):
    """A push the exporter refuses: ``reason`` is the self-metric label, ``status`` the HTTP code."""

    def __init__(self, reason: str, message: str, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def _schema_error(message: str) -> IngestError:
    return IngestError("schema", message, 422)


@dataclass(frozen=True, slots=True)
class TrainingReport:
    """One validated push from one training process."""

    seq: int
    process_start_time: float
    hostname: str
    training_job: str
    rank: str
    local_rank: str
    world_size: str
    pid: int
    pid_namespace_inode: int | None
    device: str
    torch_version: str
    framework: str
    counters: dict[str, float]
    gauges: dict[str, float]
    auth_failures: dict[tuple[str, str], float] = field(default_factory=dict)
    token_expiry: dict[str, float] = field(default_factory=dict)
    api_quota: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def process_key(self) -> tuple[str, str, str, int, int | None]:
        """Which process this is (a restart with the same PID replaces it: newer start time)."""
        return (self.hostname, self.training_job, self.rank, self.pid, self.pid_namespace_inode)


def _number(value: Any, where: str, *, nonneg: bool = False, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _schema_error(f"{where}: expected a number, got {type(value).__name__}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise _schema_error(f"{where}: expected a finite number, got {value!r}")
    if nonneg and v < 0:
        raise _schema_error(f"{where}: expected a non-negative number, got {value!r}")
    return v


def _string(value: Any, where: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _schema_error(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_LABEL_LENGTH:
        raise _schema_error(f"{where}: longer than {MAX_LABEL_LENGTH} characters")
    if not value.isascii():
        try:  # JSON may carry lone surrogates ("\ud800"); rendering them would fail every scrape
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _schema_error(f"{where}: not valid Unicode (lone surrogate)") from None
    if not allow_empty and not value:
        raise _schema_error(f"{where}: must not be empty")
    return value


def _mapping(value: Any, where: str, limit: int | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _schema_error(f"{where}: expected an object, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise IngestError("cardinality", f"{where}: more than {limit} entries", 422)
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _schema_error(f"{where}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def validate_report(data: Any) -> TrainingReport:
    """Check a decoded push against the schema (exporter.hook.schema); raise IngestError if wrong."""
    doc = _mapping(data, "body")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise _schema_error(f"body: unknown field(s) {', '.join(unknown)}")
    if doc.get("schema") != SCHEMA_VERSION:
        raise _schema_error(f"schema: expected {SCHEMA_VERSION}, got {doc.get('schema')!r}")
    seq = _int(doc.get("seq"), "seq", 0, 2**62)
    start = _number(doc.get("process_start_time"), "process_start_time", nonneg=True)
    ident = _mapping(doc.get("identity"), "identity")
    strings: dict[str, str] = {}
    for key in IDENTITY_STR_KEYS:
        strings[key] = _string(ident.get(key, ""), f"identity.{key}", allow_empty=key != "training_job")
    extra = sorted(set(ident) - set(IDENTITY_STR_KEYS) - {"pid", "pid_namespace_inode"})
    if extra:
        raise _schema_error(f"identity: unknown field(s) {', '.join(extra)}")
    pid = _int(ident.get("pid"), "identity.pid", 1, 2**31)
    ns_raw = ident.get("pid_namespace_inode")
    ns = None if ns_raw is None else _int(ns_raw, "identity.pid_namespace_inode", 0, 2**64)

    counters: dict[str, float] = {}
    for key, value in _mapping(doc.get("counters", {}), "counters").items():
        if key not in COUNTERS:
            raise _schema_error(f"counters: unknown counter {key!r}")
        counters[key] = _number(value, f"counters.{key}", nonneg=True)
    gauges: dict[str, float] = {}
    for key, value in _mapping(doc.get("gauges", {}), "gauges").items():
        if key not in GAUGES:
            raise _schema_error(f"gauges: unknown gauge {key!r}")
        if value is None:
            continue
        gauges[key] = _number(value, f"gauges.{key}", finite=key not in NONFINITE_ALLOWED)

    auth: dict[tuple[str, str], float] = {}
    failures = doc.get("auth_failures", [])
    if not isinstance(failures, list):
        raise _schema_error("auth_failures: expected a list")
    if len(failures) > MAX_SERVICES:
        raise IngestError("cardinality", f"auth_failures: more than {MAX_SERVICES} entries", 422)
    for i, item in enumerate(failures):
        entry = _mapping(item, f"auth_failures[{i}]")
        service = _string(entry.get("service"), f"auth_failures[{i}].service", allow_empty=False)
        code = _string(str(entry.get("status_code", "")), f"auth_failures[{i}].status_code")
        auth[(service, code)] = _number(entry.get("count"), f"auth_failures[{i}].count", nonneg=True)
    expiry: dict[str, float] = {}
    for svc, ts in _mapping(doc.get("token_expiry", {}), "token_expiry", MAX_SERVICES).items():
        expiry[_string(svc, "token_expiry key", allow_empty=False)] = _number(ts, f"token_expiry.{svc}")
    quota: dict[str, tuple[float, float | None]] = {}
    for svc, q in _mapping(doc.get("api_quota", {}), "api_quota", MAX_SERVICES).items():
        _string(svc, "api_quota key", allow_empty=False)
        qd = _mapping(q, f"api_quota.{svc}")
        limit = qd.get("limit")
        quota[svc] = (
            _number(qd.get("remaining"), f"api_quota.{svc}.remaining"),
            None if limit is None else _number(limit, f"api_quota.{svc}.limit"),
        )
    return TrainingReport(
        seq=seq,
        process_start_time=start,
        pid=pid,
        pid_namespace_inode=ns,
        counters=counters,
        gauges=gauges,
        auth_failures=auth,
        token_expiry=expiry,
        api_quota=quota,
        **strings,
    )


def parse_body(body: bytes, max_bytes: int = MAX_BODY_BYTES) -> TrainingReport:
    """Decode and validate a raw request body."""
    if len(body) > max_bytes:
        raise IngestError("too_large", f"body is {len(body)} bytes; the limit is {max_bytes}", 413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError("schema", f"body is not valid JSON: {exc}", 400) from exc
    except RecursionError:  # "[[[[...": deep nesting within the size limit
        raise IngestError("schema", "body is nested too deeply", 400) from None
    return validate_report(data)


@dataclass(frozen=True, slots=True)
class TrackedProcess:
    report: TrainingReport
    last_seen: float  # wall clock (Unix seconds) when the exporter last accepted a push


def _own_pid_namespace() -> int | None:
    try:
        link = os.readlink("/proc/self/ns/pid")
        return int(link[link.index("[") + 1 : link.index("]")])
    except (OSError, ValueError):
        return None


def namespace_of(host_pid: int, proc_root: str = "/proc") -> tuple[int, int] | None:
    """(pid-namespace inode, PID inside that namespace) of a host PID, from /proc; None if unknown.

    ``NSpid`` lists the PID in every namespace from the host's down to the process's own: the last
    entry is what the process itself (and so the hook) sees as its PID.
    """
    try:
        link = os.readlink(f"{proc_root}/{host_pid}/ns/pid")
        inode = int(link[link.index("[") + 1 : link.index("]")])
        with open(f"{proc_root}/{host_pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return inode, int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


class IngestStore:
    """Latest report per training process, expired ``ttl`` seconds after it was last seen.

    Thread-safe; every mutation bumps ``generation`` so a renderer can cache its output.
    """

    def __init__(
        self,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_processes: int = DEFAULT_MAX_PROCESSES,
        clock: Callable[[], float] = time.time,
        namespace_of: Callable[[int], tuple[int, int] | None] = namespace_of,
        max_jobs: int = DEFAULT_MAX_JOBS,
    ) -> None:
        self.ttl_seconds = float(ttl_seconds)
        self.max_processes = int(max_processes)
        self.max_jobs = int(max_jobs)
        self._clock = clock
        self._namespace_of = namespace_of
        self._own_ns = _own_pid_namespace()
        self._lock = threading.Lock()
        self._processes: dict[tuple[str, str, str, int, int | None], TrackedProcess] = {}
        self._requests: dict[str, int] = {"accepted": 0, "rejected": 0}
        self._rejected: dict[str, int] = {}
        self._ns_cache: dict[int, tuple[float, tuple[int, int] | None]] = {}
        self.generation = 0

    # ------------------------------------------------------------------ writes
    def submit(self, report: TrainingReport) -> str:
        """Store a validated report. Returns "accepted", or "stale" for a reordered older push.

        Raises IngestError("cardinality") when a new process would exceed ``max_processes``.
        """
        now = self._clock()
        key = report.process_key
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
            self._processes[key] = TrackedProcess(report, now)
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
            del self._processes[k]
        if dead:
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

    # ------------------------------------------------------------------ the PID join
    def enrich(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        """Poller enricher: set GpuProcess.training_job / rank for PIDs a training process reported."""
        live = self.processes()
        if not live or not snapshot.gpus:
            return snapshot
        same_ns: dict[int, TrainingReport] = {}
        other_ns: dict[tuple[int, int], TrainingReport] = {}
        for p in live:
            r = p.report
            if r.pid_namespace_inode is None or self._own_ns is None or r.pid_namespace_inode == self._own_ns:
                same_ns[r.pid] = r
            else:
                other_ns[(r.pid_namespace_inode, r.pid)] = r
        changed = False
        gpus: list[GpuSample] = []
        for gpu in snapshot.gpus:
            procs: list[GpuProcess] = []
            gpu_changed = False
            for proc in gpu.processes:
                report = same_ns.get(proc.pid)
                if report is None and other_ns:
                    ns = self._cached_namespace(proc.pid)
                    report = other_ns.get(ns) if ns is not None else None
                if report is not None:
                    proc = dataclasses.replace(proc, training_job=report.training_job, rank=report.rank)
                    gpu_changed = changed = True
                procs.append(proc)
            gpus.append(dataclasses.replace(gpu, processes=tuple(procs)) if gpu_changed else gpu)
        return dataclasses.replace(snapshot, gpus=tuple(gpus)) if changed else snapshot

    def _cached_namespace(self, host_pid: int) -> tuple[int, int] | None:
        now = time.monotonic()
        hit = self._ns_cache.get(host_pid)
        if hit is not None and now - hit[0] < 30.0:
            return hit[1]
        value = self._namespace_of(host_pid)
        if len(self._ns_cache) > 4096:
            self._ns_cache.clear()
        self._ns_cache[host_pid] = (now, value)
        return value


def make_ingest_router(
    store: IngestStore, dependencies: Sequence[Any] = (), max_body_bytes: int = MAX_BODY_BYTES
) -> APIRouter:
    """FastAPI router with POST /api/v1/training.

    ``dependencies`` (e.g. ``[Depends(require_bearer_token)]``) run before the body is read: the
    place for authentication and rate limits; they may call ``store.count_rejected(reason)``.
    Answers 202 (accepted or stale), 400 (not JSON), 413 (too large), 422 (schema, with the field),
    429 (too many processes tracked).
    """
    router = APIRouter(dependencies=list(dependencies))

    @router.post(INGEST_PATH, status_code=202)
    async def ingest_training(request: Request) -> JSONResponse:
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
                raise IngestError("too_large", f"body is {declared} bytes; the limit is {max_body_bytes}", 413)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise IngestError("too_large", f"body exceeds the limit of {max_body_bytes} bytes", 413)
            report = parse_body(bytes(body), max_body_bytes)
            outcome = store.submit(report)
        except IngestError as err:
            if err.reason != "cardinality" or err.status != 429:  # submit() counted its own
                store.count_rejected(err.reason)
            log.debug("training push rejected (%s): %s", err.reason, err)
            return JSONResponse({"error": str(err), "reason": err.reason}, status_code=err.status)
        return JSONResponse({"status": outcome}, status_code=202)

    return router
