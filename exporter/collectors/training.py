"""Renders what training processes pushed (exporter.ingest.store.IngestStore) as the training_* families.

Nothing here talks to a training process: a scrape reads the store. Names, types and help texts come
from the one table of training figures (exporter.hook.schema.FIGURES); the exposition caches the
output per store generation, so scrapes between pushes cost a dictionary lookup. Two reports
that would produce the same label set (e.g. PID 1 of the same job/rank in two containers) are
de-duplicated, the most recently seen one wins, so the exposition never carries duplicate series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from exporter.hook.schema import COUNTERS, FIGURE_BY_KEY, GAUGES, PHASES
from exporter.ingest.store import IngestStore, TrackedProcess

BASE_LABELS = ["host", "training_job", "rank", "local_rank", "world_size", "pid"]


class TrainingCollector(Collector):
    """training_* series per reporting process, plus the ingest self-metrics."""

    def __init__(self, store: IngestStore, host: str) -> None:
        self._store = store
        self._host = host

    def collect(self) -> Iterator[Metric]:
        # Not cached here: exporter.exposition renders a source once per store generation. Expired
        # processes are dropped by store.processes(), the first thing _render asks.
        yield from self._render()

    def describe(self) -> list[Metric]:
        return []

    def _render(self) -> list[Metric]:
        processes: dict[tuple[str, ...], TrackedProcess] = {}
        for p in self._store.processes():  # oldest first: a later one with the same labels wins
            r = p.report
            labels: tuple[str, ...] = (self._host, r.training_job, r.rank, r.local_rank, r.world_size, str(r.pid))
            processes[labels] = p
        out: list[Metric] = []

        info = GaugeMetricFamily(
            "training_info",
            "One per reporting training process",
            labels=[*BASE_LABELS, "device", "torch_version", "framework"],
        )
        seen = GaugeMetricFamily(
            "training_last_seen_timestamp_seconds",
            "When the exporter last received from this training process",
            labels=BASE_LABELS,
        )
        duration = SummaryMetricFamily(
            "training_step_duration_seconds", FIGURE_BY_KEY["step_duration_seconds_sum"].help, labels=BASE_LABELS
        )
        counters = {
            key: CounterMetricFamily(name, FIGURE_BY_KEY[key].help, labels=BASE_LABELS)
            for key, name in COUNTERS.items()
            if key != "step_duration_seconds_sum"
        }
        gauges = {key: GaugeMetricFamily(name, FIGURE_BY_KEY[key].help, labels=BASE_LABELS) for key, name in GAUGES.items()}
        auth = CounterMetricFamily(
            "training_auth_failures_total",
            "Authentication/authorization failures (401/403, expired token) by service",
            labels=[*BASE_LABELS, "service", "status_code"],
        )
        expiry = GaugeMetricFamily(
            "training_token_expiry_timestamp_seconds",
            "When the declared token expires (Unix time)",
            labels=[*BASE_LABELS, "service"],
        )
        q_remaining = GaugeMetricFamily(
            "training_api_quota_remaining", "Remaining API quota", labels=[*BASE_LABELS, "service"]
        )
        q_limit = GaugeMetricFamily("training_api_quota_limit", "Total API quota", labels=[*BASE_LABELS, "service"])

        for labels, p in processes.items():
            r = p.report
            lv = list(labels)
            info.add_metric([*lv, r.device, r.torch_version, r.framework], 1.0)
            seen.add_metric(lv, p.last_seen)
            c = r.counters
            if "steps" in c and "step_duration_seconds_sum" in c:
                duration.add_metric(lv, int(c["steps"]), c["step_duration_seconds_sum"])
            for key, cfam in counters.items():
                if key in c:
                    cfam.add_metric(lv, c[key])
            for key, gfam in gauges.items():
                if key in r.gauges:
                    gfam.add_metric(lv, r.gauges[key])
            for (service, code), count in sorted(r.auth_failures.items()):
                auth.add_metric([*lv, service, code], count)
            for service, ts in sorted(r.token_expiry.items()):
                expiry.add_metric([*lv, service], ts)
            for service, (remaining, limit) in sorted(r.api_quota.items()):
                q_remaining.add_metric([*lv, service], remaining)
                if limit is not None:
                    q_limit.add_metric([*lv, service], limit)

        families: list[Metric] = [info, seen, duration, *counters.values(), *gauges.values()]
        families += _diagnosis_families(processes)
        for fam in [*families, auth, expiry, q_remaining, q_limit]:
            if fam.samples:
                out.append(fam)

        requests, rejected, tracked = self._store.stats()
        req = CounterMetricFamily(
            "gpu_exporter_ingest_requests_total", "Training-hook pushes received", labels=["host", "outcome"]
        )
        for outcome in ("accepted", "rejected"):
            req.add_metric([self._host, outcome], float(requests.get(outcome, 0)))
        rej = CounterMetricFamily(
            "gpu_exporter_ingest_rejected_total", "Training-hook pushes refused, by reason", labels=["host", "reason"]
        )
        for reason, count in sorted(rejected.items()):
            rej.add_metric([self._host, reason], float(count))
        procs = GaugeMetricFamily(
            "gpu_exporter_training_processes", "Training processes currently tracked", labels=["host"]
        )
        procs.add_metric([self._host], float(tracked))
        series = GaugeMetricFamily(
            "gpu_exporter_training_series",
            "Series the tracked training processes add to /metrics (counted against the series budget)",
            labels=["host"],
        )
        series.add_metric([self._host], float(self._store.series))
        budget = GaugeMetricFamily(
            "gpu_exporter_training_series_budget",
            "Most series all training processes together may add (--training-max-series)",
            labels=["host"],
        )
        budget.add_metric([self._host], float(self._store.max_series))
        out.extend([req, rej, procs, series, budget])
        return out


def _diagnosis_families(processes: dict[tuple[str, ...], TrackedProcess]) -> list[Metric]:
    """Issue 16: phase (a state set), how the process ended, its GPU, the co-tenants at its last OOM."""
    phase = GaugeMetricFamily(
        "training_phase", "What the training thread is doing now (1 for the current phase)",
        labels=[*BASE_LABELS, "phase"],
    )
    ended = GaugeMetricFamily(
        "training_exit_timestamp_seconds",
        "When the process ended and how: normal, exception (detail: its type), signal (detail: its name), "
        "or vanished (its PID disappeared without a report; the time is its last push)",
        labels=[*BASE_LABELS, "reason", "detail"],
    )
    gpu = GaugeMetricFamily(
        "training_process_gpu_info", "The GPU this training process uses (as last seen)",
        labels=[*BASE_LABELS, "gpu", "uuid"],
    )
    oom_gpu = GaugeMetricFamily(
        "training_cuda_oom_gpu_info", "The GPU of this process's last CUDA OOM, once the exporter recorded it",
        labels=[*BASE_LABELS, "gpu", "uuid"],
    )
    holders = GaugeMetricFamily(
        "training_oom_memory_holder_bytes",
        "At this process's last CUDA OOM: the largest other holders of that GPU's memory",
        labels=[*BASE_LABELS, "gpu", "uuid", "holder_pid", "holder_training_job", "holder_rank",
                "holder_container", "holder_pod"],
    )
    for labels, p in processes.items():
        lv = list(labels)
        r = p.report
        if r.phase is not None:
            for name in PHASES:
                phase.add_metric([*lv, name], 1.0 if name == r.phase else 0.0)
        ex = p.exit
        if ex is not None:
            ended.add_metric([*lv, ex[0], ex[1]], ex[2])
        if p.gpu is not None:
            gpu.add_metric([*lv, p.gpu.index, p.gpu.uuid], 1.0)
        if p.oom is not None:
            g = p.oom.gpu
            oom_gpu.add_metric([*lv, g.index, g.uuid], 1.0)
            for h in p.oom.holders:
                holders.add_metric(
                    [*lv, g.index, g.uuid, str(h.pid), h.training_job, h.rank, h.container, h.pod],
                    float(h.used_memory_bytes),
                )
    return [phase, ended, gpu, oom_gpu, holders]
