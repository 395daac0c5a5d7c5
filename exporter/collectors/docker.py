"""Self-metrics of container attribution: is the Docker engine answering, and how often did it fail.

Rendered from ``ContainerAttributor.stats()`` at scrape time (no Docker call happens here), so a dead
daemon shows as ``gpu_exporter_docker_up 0`` plus a growing ``gpu_exporter_docker_errors_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.collectors.attribution import SourceStats


class DockerCollector(Collector):
    """``gpu_exporter_docker_up`` and ``gpu_exporter_docker_errors_total{kind}`` for one host."""

    def __init__(self, stats: Callable[[], SourceStats], host: str) -> None:
        self._stats = stats
        self._host = host

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        up = GaugeMetricFamily(
            "gpu_exporter_docker_up",
            "1 when the Docker engine answered the last container lookup, 0 when it did not",
            labels=["host"],
        )
        if stats.up is not None:  # not asked yet: no series rather than a made-up value
            up.add_metric([self._host], 1.0 if stats.up else 0.0)
        yield up
        errors = CounterMetricFamily(
            "gpu_exporter_docker_errors_total",
            "Docker engine lookups that failed, by kind (unavailable, permission, timeout, api, ...)",
            labels=["host", "kind"],
        )
        for kind, count in sorted(stats.errors.items()):
            errors.add_metric([self._host, kind], float(count))
        yield errors

    def describe(self) -> list[Metric]:
        return []
