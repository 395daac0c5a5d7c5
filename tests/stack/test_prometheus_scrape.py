"""The exposition as the Prometheus tools see it: promtool's lint on a real scrape, and a real
Prometheus scraping the exporter and answering PromQL with the simulated GPUs' values."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.support import (
    http_get,
    parse_metrics,
    prom_query,
    require_binary,
    start_exporter,
    start_prometheus,
    wait_until,
)

OPENMETRICS_ACCEPT = {"Accept": "application/openmetrics-text;version=1.0.0"}


@pytest.fixture(scope="module")
def exporter_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("scrape-logs")
    proc, base = start_exporter(logs, "--simulate", "healthy-8gpu", "--interval", "0.5", "--host-label", "node-p")
    try:
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, timeout=20, message="readyz 200")
        yield base
    finally:
        proc.stop()


@pytest.mark.parametrize("headers", [{}, OPENMETRICS_ACCEPT], ids=["text", "openmetrics"])
def test_promtool_check_metrics_on_a_real_scrape(exporter_url: str, headers: dict[str, str]) -> None:
    promtool = require_binary("promtool")
    status, body = http_get(exporter_url + "/metrics", headers=headers)
    assert status == 200
    assert "gpu_temperature_celsius" in body and "gpu_exporter_build_info" in body
    if headers:
        # promtool lints the classic text format only; check the OpenMetrics body parses strictly.
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        assert sum(1 for _ in text_string_to_metric_families(body)) > 10
        return
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    # promtool prints one line per naming/help problem and exits non-zero on any.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@pytest.mark.slow
def test_real_prometheus_scrapes_and_answers_promql(exporter_url: str, log_dir: Path) -> None:
    target = exporter_url.removeprefix("http://")
    config = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: gpu
    static_configs:
      - targets: ["{target}"]
"""
    prom, base = start_prometheus(log_dir, config)
    try:
        def scraped() -> list[dict[str, object]] | None:
            up = prom_query(base, 'up{job="gpu"}')
            return up if up and up[0]["value"][1] == "1" else None  # type: ignore[index]

        wait_until(scraped, timeout=30, message="Prometheus to scrape the exporter successfully")
        wait_until(
            lambda: prom_query(base, 'count(gpu_up{host="node-p"} == 1)'), timeout=30, message="gpu_up series"
        )
        assert prom_query(base, 'count(gpu_up{host="node-p"} == 1)')[0]["value"][1] == "8"

        # Static values (memory totals) must match what the exporter serves, GPU by GPU.
        served = parse_metrics(http_get(exporter_url + "/metrics")[1])
        expected = {labels["gpu"]: value for labels, value in served["gpu_memory_total_bytes"]}
        assert len(expected) == 8
        result = prom_query(base, "gpu_memory_total_bytes")
        got = {r["metric"]["gpu"]: float(r["value"][1]) for r in result}
        assert got == expected
        sample = result[0]["metric"]
        assert sample["host"] == "node-p" and sample["uuid"].startswith("GPU-")

        # A join through gpu_info works as documented in docs/metrics.md.
        joined = prom_query(base, "gpu_temperature_celsius * on(host, gpu, uuid) group_left(name) gpu_info")
        assert len(joined) == 8 and all(r["metric"].get("name") for r in joined)

        # The exporter's own series made it too (counters under OpenMetrics keep their _total name).
        assert prom_query(base, 'gpu_exporter_polls_total{host="node-p"} > 0')
        assert prom_query(base, 'gpu_exporter_collector_success{collector="gpu"} == 1')
        assert prom_query(base, 'scrape_samples_scraped{job="gpu"} > 100')
    finally:
        prom.stop()
