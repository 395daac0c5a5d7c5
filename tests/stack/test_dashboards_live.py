"""Every query of every dashboard panel returns data from a real Prometheus.

A real Prometheus scrapes the real exporter running the simulated healthy-8gpu node, two ranks of the
sample workload report through the hook, and faults are injected (simulator events: XIDs, a lost GPU, ECC, PCIe
replays, row remaps, throttling, an idle GPU; workload faults: OOM, NaN loss, expired token, a slow
rank) so the panels for rare events have data too. Template variables are resolved from the live
label values (dashboards.live); a query that returns nothing fails the test with the dashboard, the
panel title and the query as sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboards.live import PrometheusError, label_values, prom_api, resolve_variables, run
from dashboards.queries import Query, iter_queries, load_dashboards
from harness.dashboard_stack import HOST, JOB, DashboardStack


@pytest.mark.slow
def test_every_panel_query_returns_data(log_dir: Path) -> None:
    with DashboardStack(log_dir) as stack:
        try:
            window = stack.wait_for_data(timeout=100)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from None
        # The variables resolved from live data, not from a default: the test saw the real labels.
        assert label_values(stack.prometheus, "training_info", "training_job", window) == [JOB]
        assert HOST in label_values(stack.prometheus, "gpu_up", "host", window)
        # The shipped (fast-profile) rules are loaded and evaluate: the alert panels show real ALERTS.
        rules = [r for g in prom_api(stack.prometheus, "rules", {})["groups"] for r in g["rules"]]
        assert len(rules) > 10, rules
        assert [r["name"] for r in rules if r.get("health") != "ok"] == []
        # The first XID of its kind on a GPU shows (a series born with its first event: increase()
        # alone would draw 0 for it), and so do the ECC errors injected once the fleet was scraped.
        detail = load_dashboards()["gpu-detail.json"]
        variables = resolve_variables(stack.prometheus, detail, window, stack.prefer)
        for panel in ("XID errors", "ECC errors"):
            q = next(q for q in iter_queries(detail) if q.panel == panel)
            expr, series = run(stack.prometheus, q, variables, window)
            peak = max((float(v) for s in series for _, v in s["values"]), default=0.0)
            assert peak > 0, f"GPU detail / {panel}: {expr} never above 0 after the injected fault"
        # The check can fail: a misspelled metric returns no data and a bad query is refused.
        q = Query("test", "typo", "A", 'gpu_utilisation_ratio{host=~"$host"}', False)
        assert run(stack.prometheus, q, {"host": HOST}, window)[1] == []
        with pytest.raises(PrometheusError):
            run(stack.prometheus, Query("test", "bad", "A", "rate(gpu_up[", True), {}, window)
