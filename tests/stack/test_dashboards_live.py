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
        # The link, recovery and MIG panels show the injected faults, not just "some data".
        def last_values(dashboard: str, panel: str) -> dict[str, float]:
            dash = load_dashboards()[dashboard]
            variables = resolve_variables(stack.prometheus, dash, window, stack.prefer)
            out: dict[str, float] = {}
            for q in (q for q in iter_queries(dash) if q.panel == panel):
                _, series = run(stack.prometheus, q, variables, window)
                for s in series:
                    value = s["values"][-1][1] if "values" in s else s["value"][1]
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s["metric"].items()) if k != "__name__")
                    out[f"{labels},ref={q.ref}"] = float(value)
            return out

        links = last_values("gpu-detail.json", "NVLink links up")
        assert len(links) == 18 and [k for k, v in links.items() if v == 0] == [
            next(k for k in links if "link=3" in k.split(","))], links
        assert any(v > 0 for k, v in last_values("gpu-detail.json", "NVLink errors").items()
                   if "link=4" in k.split(","))
        assert sorted(last_values("gpu-detail.json", "PCIe link width").values()) == [8.0, 16.0]
        assert any({"action=drain_p2p", "gpu=6"} <= set(k.split(","))
                   for k in last_values("fleet.json", "Recovery actions requested"))
        assert list(last_values("fleet.json", "GPUs asking for recovery").values()) == [1.0]
        mig = last_values("fleet.json", "MIG devices")
        assert len(mig) == 3 and all({"gpu=7", "profile=2g.20gb"} <= set(k.split(",")) for k in mig), mig
        assert sorted(last_values("fleet.json", "MIG instance memory used").values()) == pytest.approx([0.6] * 3)
        # The check can fail: a misspelled metric returns no data and a bad query is refused.
        q = Query("test", "typo", "A", 'gpu_utilisation_ratio{host=~"$host"}', False)
        assert run(stack.prometheus, q, {"host": HOST}, window)[1] == []
        with pytest.raises(PrometheusError):
            run(stack.prometheus, Query("test", "bad", "A", "rate(gpu_up[", True), {}, window)
