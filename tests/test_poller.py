"""Poller and exposition cache, in-process with a small test reader (the real NVML path is covered by
the HTTP tests, which run ``python -m exporter --simulate``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.exporter_health import ExporterHealthCollector
from exporter.exposition import OPENMETRICS, TEXT, Exposition, Source, negotiate
from exporter.poller import Poller
from exporter.snapshot import GpuSample, NodeSnapshot
from harness.support import parse_metrics, wait_until


class StepReader:
    """Returns a new snapshot per read; ``gate`` (when set) makes read() block like a hung driver."""

    def __init__(self) -> None:
        self.reads = 0
        self.gate: threading.Event | None = None
        self.nvml_up = True
        self.lost: set[int] = set()

    def read(self) -> NodeSnapshot:
        if self.gate is not None:
            self.gate.wait(10)
        self.reads += 1
        gpus = tuple(
            GpuSample(index=i, uuid=f"GPU-{i}", up=i not in self.lost, error="gpu_lost" if i in self.lost else None)
            for i in range(2)
        )
        return NodeSnapshot(host="h", timestamp_seconds=time.time(), nvml_up=self.nvml_up, gpus=gpus)


class CountingCollector:
    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.renders = 0

    def collect(self) -> Iterator[Metric]:
        self.renders += 1
        g = GaugeMetricFamily("gpu_test_reads", "reads so far", labels=["host"])
        snap = self.poller.latest
        g.add_metric(["h"], float(self.poller.generation if snap else -1))
        yield g


def test_enrichers_run_and_a_failing_one_is_counted() -> None:
    def tag(snap: NodeSnapshot) -> NodeSnapshot:
        return NodeSnapshot(host="enriched", timestamp_seconds=snap.timestamp_seconds, nvml_up=True)

    def boom(snap: NodeSnapshot) -> NodeSnapshot:
        raise RuntimeError("docker down")

    poller = Poller(StepReader(), 60, enrichers=[tag, boom])
    snap = poller.poll_once()
    assert snap.host == "enriched"  # the good enricher's result is kept, the failing one skipped
    assert poller.latest is snap
    assert poller.stats.errors_total == {"enricher": 1}
    assert poller.generation == 1


def test_error_kinds_counted_from_snapshot() -> None:
    reader = StepReader()
    reader.nvml_up = False
    reader.lost = {1}
    poller = Poller(reader, 60)
    poller.poll_once()
    poller.poll_once()
    assert poller.stats.errors_total == {"nvml_init": 2, "gpu_lost": 2}
    assert poller.stats.polls_total == 2


def test_hung_read_keeps_serving_the_previous_snapshot() -> None:
    reader = StepReader()
    poller = Poller(reader, 0.01)
    exposition = Exposition([Source("test", CountingCollector(poller), generation=lambda: poller.generation)])
    health = ExporterHealthCollector(poller, "h", "test", sources=lambda: exposition.sources)
    exposition.add(Source("exporter", health))
    poller.start()
    try:
        assert poller.wait_first(5)
        reader.gate = threading.Event()  # the next read blocks
        wait_until(lambda: poller.stats.in_progress_since is not None, timeout=5, message="a blocked poll")
        generation = poller.generation
        started = time.monotonic()
        body = exposition.render(TEXT).decode()
        assert time.monotonic() - started < 1.0  # did not wait for the hung read
        samples = parse_metrics(body)
        assert samples["gpu_test_reads"][0][1] == generation
        assert samples["gpu_exporter_snapshot_age_seconds"][0][1] >= 0
        # The age grows while the poll hangs.
        first_age = samples["gpu_exporter_snapshot_age_seconds"][0][1]
        wait_until(
            lambda: parse_metrics(exposition.render(TEXT).decode())["gpu_exporter_snapshot_age_seconds"][0][1]
            > first_age + 0.05,
            timeout=5,
            message="snapshot age to grow",
        )
        reader.gate.set()
        wait_until(lambda: poller.generation > generation, timeout=5, message="poll after the hang")
    finally:
        if reader.gate:
            reader.gate.set()
        poller.stop()


def test_render_is_cached_per_generation_and_format() -> None:
    poller = Poller(StepReader(), 60)
    collector = CountingCollector(poller)
    exposition = Exposition([Source("test", collector, generation=lambda: poller.generation)])
    poller.poll_once()
    a = exposition.render(TEXT)
    assert exposition.render(TEXT) is a  # single source: the same cached bytes object
    assert collector.renders == 1
    om = exposition.render(OPENMETRICS)
    assert om.endswith(b"# EOF\n") and om.count(b"# EOF") == 1
    assert collector.renders == 2
    poller.poll_once()
    assert exposition.render(TEXT) != a
    assert collector.renders == 3


def test_prerender_only_while_scraped(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a poll the exposition pre-renders only if /metrics was scraped recently: an exporter
    nobody scrapes pays for its polls, not for renders."""
    poller = Poller(StepReader(), 60)
    collector = CountingCollector(poller)
    exposition = Exposition([Source("test", collector, generation=lambda: poller.generation)])
    poller.add_listener(lambda _snapshot: exposition.warm())
    poller.poll_once()
    poller.poll_once()
    assert collector.renders == 0  # never scraped: nothing rendered
    exposition.render(TEXT)
    assert collector.renders == 1
    poller.poll_once()  # scraped just now: the new snapshot is rendered on the poller thread
    assert collector.renders == 2 and exposition.is_cached(TEXT)
    exposition.render(TEXT)
    assert collector.renders == 2  # the scrape found it cached
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + Exposition.WARM_WHILE_SCRAPED_SECONDS + 1)
    poller.poll_once()  # nobody scraped for longer than the window: no pre-render
    assert collector.renders == 2 and not exposition.is_cached(TEXT)


def test_prerender_only_in_the_formats_scraped() -> None:
    """Prometheus negotiates OpenMetrics: a poll then pre-renders OpenMetrics only, not text as well."""
    poller = Poller(StepReader(), 60)
    collector = CountingCollector(poller)
    exposition = Exposition([Source("test", collector, generation=lambda: poller.generation)])
    poller.add_listener(lambda _snapshot: exposition.warm())
    poller.poll_once()
    exposition.render(OPENMETRICS)
    assert collector.renders == 1
    poller.poll_once()
    assert collector.renders == 2  # one render: OpenMetrics
    assert exposition.is_cached(OPENMETRICS) and not exposition.is_cached(TEXT)


def test_failing_collector_reports_success_zero_and_others_render() -> None:
    class Broken:
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("bad data")

    poller = Poller(StepReader(), 60)
    exposition = Exposition(
        [Source("broken", Broken(), generation=lambda: poller.generation), Source("ok", CountingCollector(poller))]
    )
    exposition.add(
        Source("exporter", ExporterHealthCollector(poller, "h", "test", sources=lambda: exposition.sources))
    )
    poller.poll_once()
    samples = parse_metrics(exposition.render(TEXT).decode())
    success = {labels["collector"]: v for labels, v in samples["gpu_exporter_collector_success"]}
    assert success == {"broken": 0.0, "ok": 1.0}
    assert "gpu_test_reads" in samples
    assert samples["gpu_exporter_nvml_up"][0][1] == 1.0
    assert samples["gpu_exporter_polls_total"][0][1] == 1.0


def test_poll_now_skips_the_wait() -> None:
    reader = StepReader()
    poller = Poller(reader, 3600)
    poller.start()
    try:
        assert poller.wait_first(5)
        poller.poll_now()
        wait_until(lambda: reader.reads >= 2, timeout=5, message="an immediate second poll")
    finally:
        poller.stop()


def test_negotiation() -> None:
    prometheus = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    assert negotiate(prometheus) == OPENMETRICS
    assert negotiate("application/openmetrics-text") == OPENMETRICS
    assert negotiate("text/plain") == TEXT
    assert negotiate(None) == TEXT
    assert negotiate("application/openmetrics-text;q=0,text/plain") == TEXT


class GatedCollector:
    """A collector whose render blocks until ``gate`` is set (a slow render of many training series)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.rendering = threading.Event()

    def collect(self) -> Iterator[Metric]:
        self.rendering.set()
        self.gate.wait(20)
        g = GaugeMetricFamily("slow_render_value", "rendered after the gate opened")
        g.add_metric([], 1.0)
        yield g

    def describe(self) -> list[Metric]:
        return []


def test_an_uncached_render_runs_off_the_event_loop() -> None:
    """While /metrics renders a changed source, /healthz (same server, same event loop) still answers."""
    import uvicorn

    from exporter.web.app import create_app
    from harness.support import free_port, http_get

    poller = Poller(StepReader(), 60.0)
    slow = GatedCollector()
    generation = [0]
    app = create_app(poller, host="h", collectors=[Source("slow", slow, generation=lambda: generation[0])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(base + "/healthz", timeout=1)[0] == 200, timeout=20, message="server up")
        generation[0] += 1  # the slow source's cache is now stale: the next scrape renders it
        result: list[tuple[int, str]] = []
        scrape = threading.Thread(target=lambda: result.append(http_get(base + "/metrics", timeout=30)[:2]))
        scrape.start()
        assert slow.rendering.wait(20), "the scrape never started rendering"
        assert http_get(base + "/healthz", timeout=5)[0] == 200
        assert scrape.is_alive() and not result, "the render finished early: nothing was proven"
        slow.gate.set()
        scrape.join(20)
        assert result and result[0][0] == 200 and "slow_render_value 1.0" in result[0][1]
    finally:
        slow.gate.set()
        server.should_exit = True
        serving.join(10)
