"""exporter.exposition.render_text must write exactly what prometheus_client's generate_latest writes.

It is a faster copy of the text format for our collectors' simple families, so every case here compares
the two outputs byte for byte: every shipped scenario over its timeline, training series with hostile
label values, the exporter's own health families, and random families from hypothesis.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)

from exporter.collectors.gpu import GpuCollector
from exporter.collectors.training import TrainingCollector
from exporter.exposition import TEXT, _render, render_text
from exporter.ingest.store import IngestStore
from exporter.ingest.validate import validate_report
from exporter.nvml import NvmlReader
from exporter.simulate import install, load_scenario, shipped_scenarios
from harness.clock import FakeClock
from harness.payloads import payload


class _Fixed:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families

    def describe(self) -> list[Any]:
        return []


def assert_same(collector: Any) -> bytes:
    ours = _render(collector, TEXT)
    reference = generate_latest(_Fixed(list(collector.collect())))  # type: ignore[arg-type]
    assert ours == reference
    return ours


def test_every_shipped_scenario_renders_identically() -> None:
    clock = FakeClock(0.0)
    for name in shipped_scenarios():
        sim = install(load_scenario(name), clock=clock)
        reader = NvmlReader("node-t", xid_retry_seconds=0.05)
        try:
            for _ in range(6):
                snap = reader.read()
                body = assert_same(GpuCollector(lambda snap=snap: snap))
                assert b"gpu_up{" in body, name
                clock.advance(5)
        finally:
            reader.close()
            sim.uninstall()


def test_training_series_with_hostile_label_values_render_identically() -> None:
    store = IngestStore()
    for i, job in enumerate(['plain', 'quote " here', "back\\slash", "new\nline", "ünïcödé ✓", ""]):
        doc = payload()
        doc["identity"]["training_job"] = job or "x"
        doc["identity"]["pid"] = 1000 + i
        store.submit(validate_report(doc))
    body = assert_same(TrainingCollector(store, 'host "h"\\'))
    assert b'training_job="quote \\" here"' in body and b'training_job="new\\nline"' in body


def test_fallback_families_render_identically() -> None:
    summary = SummaryMetricFamily("s_seconds", "a summary", labels=["a"])
    summary.add_metric(["x"], count_value=3, sum_value=1.5)
    created = CounterMetricFamily("c", "with created", labels=["a"], created=1700000000.0)
    created.add_metric(["x"], 2.0, created=1700000000.0)
    stamped = GaugeMetricFamily("g_stamped", "with a timestamp")
    stamped.add_metric([], 1.0, timestamp=1700000000.5)
    info = InfoMetricFamily("build", "an info family", value={"version": "1.2"})
    unknown = UnknownMetricFamily("u", "untyped\nhelp with \\ and newline")
    unknown.add_metric([], -0.0)
    assert_same(_Fixed([summary, created, stamped, info, unknown]))


label_value = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**18), max_value=10**18).map(float),
    st.sampled_from([0.0, -0.0, 1e6, 1234567.0, 1e-7, 0.1, math.inf, -math.inf]),
)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["gauge", "counter", "unknown"]),
    rows=st.lists(st.tuples(label_value, label_value, number), max_size=6),
    doc=st.text(max_size=20),
)
def test_random_families_render_identically(kind: str, rows: list[tuple[str, str, float]], doc: str) -> None:
    cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "unknown": UnknownMetricFamily}[kind]
    family = cls("rand_metric", doc or "h", labels=["a", "b"])
    for a, b, value in rows:
        family.add_metric([a, b], value)
    ours = render_text([family])
    assert ours == generate_latest(_Fixed([family]))  # type: ignore[arg-type]
