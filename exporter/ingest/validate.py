"""What a training push must look like, checked strictly before anything is stored.

The hook (exporter.hook) POSTs cumulative snapshots in the format of exporter.hook.schema; a push that
is too large, not JSON, off-schema or too wide gets an ``IngestError`` naming the offending field (the
router turns it into a 4xx), and never touches the store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.hook.schema import (
    COUNTERS,
    EXIT_REASONS,
    GAUGES,
    IDENTITY_STR_KEYS,
    MAX_BODY_BYTES,
    MAX_LABEL_LENGTH,
    MAX_SERVICES,
    NONFINITE_ALLOWED,
    PHASES,
    SCHEMA_VERSION,
)

_TOP_KEYS = frozenset(
    {"schema", "seq", "process_start_time", "sent_at", "identity", "counters", "gauges"}
    | {"auth_failures", "token_expiry", "api_quota"}
    | {"phase", "exit", "push_interval_seconds", "gpu_uuid"}  # issue 16
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
    slurm_job: str = ""
    slurm_procid: str = ""
    # issue 16: progress and exits
    gpu_uuid: str = ""
    phase: str | None = None
    exit: tuple[str, str, float] | None = None  # (reason, detail, Unix time)
    push_interval: float | None = None

    @property
    def series(self) -> int:
        """How many series this report adds to /metrics (collectors.training renders exactly these)."""
        c = self.counters
        n = 2 + len(c) + len(self.gauges) + len(self.auth_failures) + len(self.token_expiry)  # + info, last_seen
        if "step_duration_seconds_sum" in c:  # a summary: _sum, plus _count when steps is known too
            n += 1 if "steps" in c else -1
        n += (len(PHASES) if self.phase is not None else 0) + (1 if self.exit is not None else 0)  # issue 16
        return n + sum(1 if limit is None else 2 for _, limit in self.api_quota.values())

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


_AUTH_KEYS = frozenset({"service", "status_code", "count"})
_QUOTA_KEYS = frozenset({"remaining", "limit"})


def _no_unknown_keys(entry: Mapping[str, Any], where: str, known: frozenset[str]) -> None:
    extra = sorted(str(k) for k in set(entry) - known)
    if extra:
        raise _schema_error(f"{where}: unknown field(s) {', '.join(extra)}")


def validate_report(data: Any) -> TrainingReport:
    """Check a decoded push against the schema (exporter.hook.schema); raise IngestError if wrong."""
    doc = _mapping(data, "body")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise _schema_error(f"body: unknown field(s) {', '.join(unknown)}")
    if type(doc.get("schema")) is not int or doc.get("schema") != SCHEMA_VERSION:  # True == 1 in Python
        raise _schema_error(f"schema: expected {SCHEMA_VERSION}, got {doc.get('schema')!r}")
    seq = _int(doc.get("seq"), "seq", 0, 2**62)
    start = _number(doc.get("process_start_time"), "process_start_time", nonneg=True)
    if "sent_at" in doc:  # informational (not stored), but typed like everything else
        _number(doc["sent_at"], "sent_at", nonneg=True)
    ident = _mapping(doc.get("identity"), "identity")
    strings: dict[str, Any] = {}  # str values; Any: TrainingReport has non-str keyword fields too
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
        _no_unknown_keys(entry, f"auth_failures[{i}]", _AUTH_KEYS)
        service = _string(entry.get("service"), f"auth_failures[{i}].service", allow_empty=False)
        code = _string(entry.get("status_code"), f"auth_failures[{i}].status_code", allow_empty=False)
        auth[(service, code)] = _number(entry.get("count"), f"auth_failures[{i}].count", nonneg=True)
    expiry: dict[str, float] = {}
    for svc, ts in _mapping(doc.get("token_expiry", {}), "token_expiry", MAX_SERVICES).items():
        expiry[_string(svc, "token_expiry key", allow_empty=False)] = _number(ts, f"token_expiry.{svc}")
    quota: dict[str, tuple[float, float | None]] = {}
    for svc, q in _mapping(doc.get("api_quota", {}), "api_quota", MAX_SERVICES).items():
        _string(svc, "api_quota key", allow_empty=False)
        qd = _mapping(q, f"api_quota.{svc}")
        _no_unknown_keys(qd, f"api_quota.{svc}", _QUOTA_KEYS)
        limit = qd.get("limit")
        quota[svc] = (
            _number(qd.get("remaining"), f"api_quota.{svc}.remaining"),
            None if limit is None else _number(limit, f"api_quota.{svc}.limit"),
        )
    return TrainingReport(
        **_progress(doc),
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


def _progress(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Issue 16's top-level keys: phase, exit, push_interval_seconds, gpu_uuid (all optional)."""
    out: dict[str, Any] = {}
    phase = doc.get("phase")
    if phase is not None:
        if phase not in PHASES:
            raise _schema_error(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
        out["phase"] = phase
    ex = doc.get("exit")
    if ex is not None:
        e = _mapping(ex, "exit")
        extra = sorted(set(e) - {"reason", "detail", "timestamp"})
        if extra:
            raise _schema_error(f"exit: unknown field(s) {', '.join(extra)}")
        reason = e.get("reason")
        if reason not in EXIT_REASONS:
            raise _schema_error(f"exit.reason: expected one of {', '.join(EXIT_REASONS)}, got {reason!r}")
        detail = _string(e.get("detail", ""), "exit.detail")
        out["exit"] = (reason, detail, _number(e.get("timestamp"), "exit.timestamp", nonneg=True))
    if doc.get("gpu_uuid") is not None:
        out["gpu_uuid"] = _string(doc.get("gpu_uuid"), "gpu_uuid")
    interval = doc.get("push_interval_seconds")
    if interval is not None:
        value = _number(interval, "push_interval_seconds", nonneg=True)
        if not 0 < value <= 3600:
            raise _schema_error(f"push_interval_seconds: expected (0, 3600], got {interval!r}")
        out["push_interval"] = value
    return out


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
