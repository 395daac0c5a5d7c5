"""The exporter's own health: build facts, NVML state, poll counters and timings, snapshot age, and
node_exporter-style success/duration per collector.

Rendered on every scrape (the age changes continuously), from numbers the poller and the renderer
already keep, so it costs a few dozen samples and no I/O.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.exposition import Source
from exporter.poller import Poller

# Error kinds shown as 0 from the start, so rate() and alerts work before the first error.
KNOWN_ERROR_KINDS = ("nvml_init", "gpu_lost", "unknown")


class ExporterHealthCollector(Collector):
    """``gpu_exporter_*`` self-metrics for one host (names: docs/metrics.md, "The exporter itself")."""

    def __init__(
        self,
        poller: Poller,
        host: str,
        nvml_library: str,
        sources: Callable[[], Sequence[Source]] = lambda: (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._poller = poller
        self._host = host
        self._sources = sources
        self._clock = clock
        self._build_labels = [host, __version__, platform.python_version(), nvml_library]

    def collect(self) -> Iterator[Metric]:
        host = self._host
        stats = self._poller.stats
        snapshot = self._poller.latest

        build = GaugeMetricFamily(
            "gpu_exporter_build_info",
            "Build facts of the running exporter (always 1)",
            labels=["host", "version", "python_version", "nvml_library"],
        )
        build.add_metric(self._build_labels, 1.0)
        yield build

        nvml_up = GaugeMetricFamily(
            "gpu_exporter_nvml_up", "1 when NVML initialised and answered the last poll", labels=["host"]
        )
        nvml_up.add_metric([host], 1.0 if snapshot is not None and snapshot.nvml_up else 0.0)
        yield nvml_up

        polls = CounterMetricFamily("gpu_exporter_polls", "Poll cycles run", labels=["host"])
        polls.add_metric([host], float(stats.polls_total))
        yield polls

        errors = CounterMetricFamily(
            "gpu_exporter_poll_errors", "Poll errors by kind (nvml_init, gpu_lost, ...)", labels=["host", "kind"]
        )
        counts = dict.fromkeys(KNOWN_ERROR_KINDS, 0) | stats.errors_total
        for kind in sorted(counts):
            errors.add_metric([host, kind], float(counts[kind]))
        yield errors

        if stats.last_duration_seconds is not None:
            duration = GaugeMetricFamily(
                "gpu_exporter_poll_duration_seconds", "Duration of the last poll", labels=["host"]
            )
            duration.add_metric([host], stats.last_duration_seconds)
            yield duration

        if stats.last_success_timestamp_seconds is not None:
            last = GaugeMetricFamily(
                "gpu_exporter_last_successful_poll_timestamp_seconds",
                "Unix time of the last poll that produced a snapshot",
                labels=["host"],
            )
            last.add_metric([host], stats.last_success_timestamp_seconds)
            yield last

        if snapshot is not None:
            age = GaugeMetricFamily(
                "gpu_exporter_snapshot_age_seconds",
                "Age of the snapshot being served (grows while a poll hangs)",
                labels=["host"],
            )
            age.add_metric([host], max(0.0, self._clock() - snapshot.timestamp_seconds))
            yield age

        sources = [s for s in self._sources() if s.generation is not None or s.collector is not self]
        success = GaugeMetricFamily(
            "gpu_exporter_collector_success",
            "1 when this collector rendered on its last run, 0 when it failed",
            labels=["host", "collector"],
        )
        duration_by = GaugeMetricFamily(
            "gpu_exporter_collector_duration_seconds",
            "Time this collector took to render on its last run",
            labels=["host", "collector"],
        )
        series = GaugeMetricFamily(
            "gpu_exporter_series",
            "Series (samples) this collector put on /metrics at its last render",
            labels=["host", "collector"],
        )
        for source in sources:
            success.add_metric([host, source.name], 1.0 if source.last_success else 0.0)
            duration_by.add_metric([host, source.name], source.last_duration_seconds)
            series.add_metric([host, source.name], float(source.last_series))
        yield success
        yield duration_by
        yield series

    def describe(self) -> list[Metric]:
        return []
