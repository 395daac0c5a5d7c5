"""Renders what training processes pushed (exporter.ingest.IngestStore) as the training_* families.

Nothing here talks to a training process: a scrape reads the store. The rendered families are cached
by the store's generation counter, so scrapes between pushes cost a dictionary lookup. Two reports
that would produce the same label set (e.g. PID 1 of the same job/rank in two containers) are
de-duplicated, the most recently seen one wins, so the exposition never carries duplicate series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from exporter.hook.schema import COUNTERS, GAUGES
from exporter.ingest.store import IngestStore, TrackedProcess

BASE_LABELS = ["host", "training_job", "rank", "local_rank", "world_size", "pid"]

_HELP: dict[str, str] = {
    "training_steps_total": "Optimizer steps completed by this training process",
    "training_data_wait_seconds_total": "Time spent waiting for the next batch",
    "training_compute_seconds_total": "Time between batch arrival and step end (straggler detection under DDP)",
    "training_samples_total": "Samples processed",
    "training_tokens_total": "Tokens processed",
    "training_nonfinite_loss_total": "NaN/Inf losses seen",
    "training_cuda_alloc_retries_total": "CUDA caching-allocator retries (cache flush and retry)",
    "training_cuda_oom_total": "CUDA out-of-memory errors, including ones the training code caught",
    "training_last_step_duration_seconds": "Duration of the most recent step",
    "training_samples_per_second": "Recent sample throughput (hook-side moving window)",
    "training_tokens_per_second": "Recent token throughput (hook-side moving window)",
    "training_loss": "Last sampled loss (read without forcing a device sync)",
    "training_last_progress_timestamp_seconds": "Unix time of the last completed step",
    "training_model_flops_utilization_ratio": "Model FLOPs utilization, when the job gives FLOPs per step",
    "training_cuda_memory_allocated_bytes": "CUDA caching allocator: bytes allocated now",
    "training_cuda_memory_reserved_bytes": "CUDA caching allocator: bytes reserved now",
    "training_cuda_memory_max_allocated_bytes": "CUDA caching allocator: peak bytes allocated",
    "training_cuda_memory_max_reserved_bytes": "CUDA caching allocator: peak bytes reserved",
    "training_cuda_oom_last_requested_bytes": "Size requested by the last failed CUDA allocation",
    "training_cuda_oom_last_free_bytes": "Device free memory at the last CUDA OOM",
    "training_cuda_oom_last_timestamp_seconds": "Unix time of the last CUDA OOM",
}


class TrainingCollector(Collector):
    """training_* series per reporting process, plus the ingest self-metrics."""

    def __init__(self, store: IngestStore, host: str) -> None:
        self._store = store
        self._host = host
        self._lock = threading.Lock()
        self._cache: tuple[int, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        self._store.expire()
        generation = self._store.generation
        with self._lock:
            cached = self._cache
            if cached is None or cached[0] != generation:
                # Read the generation before the data: a push racing the render only makes the
                # cache stale one scrape early, never serves old data under a new generation.
                cached = (generation, self._render())
                self._cache = cached
        yield from cached[1]

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
            "training_step_duration_seconds", "Wall time per step", labels=BASE_LABELS
        )
        counters = {
            key: CounterMetricFamily(name, _HELP.get(name, name), labels=BASE_LABELS)
            for key, name in COUNTERS.items()
            if key != "step_duration_seconds_sum"
        }
        gauges = {key: GaugeMetricFamily(name, _HELP.get(name, name), labels=BASE_LABELS) for key, name in GAUGES.items()}
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
        out.extend([req, rej, procs])
        return out
