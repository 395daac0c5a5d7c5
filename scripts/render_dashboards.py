"""Render every panel of the dashboards from live Prometheus data to PNG files (matplotlib).

A reviewer without Grafana sees what each dashboard shows: one PNG per dashboard in the dashboards'
own grid layout (previews/<uid>.png). Queries are exactly the dashboard's (dashboards.live), with the
template variables resolved from the live label values.

    .venv/bin/python -m scripts.render_dashboards            # start exporter + sample workload + Prometheus
    .venv/bin/python -m scripts.render_dashboards --prometheus http://127.0.0.1:9090 --range 1h
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from dashboards.grafana import Json
from dashboards.live import PrometheusError, Window, resolve_variables, run
from dashboards.queries import Query, load_dashboards

REPO_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("render_dashboards")
UNIT_SCALES: dict[str, list[tuple[float, str]]] = {
    "bytes": [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")],
    "Bps": [(1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s"), (1, "B/s")],
    "hertz": [(1e9, "GHz"), (1e6, "MHz"), (1e3, "kHz"), (1, "Hz")],
    "watt": [(1e3, "kW"), (1, "W")],
    "s": [(86400, "d"), (3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms")],
}


def fmt_value(value: float, unit: str) -> str:
    """A value in the panel's Grafana unit, human-sized."""
    if value != value:  # NaN
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "celsius":
        return f"{value:.0f} °C"
    if unit == "kwatth":
        return f"{value:.3g} kWh"
    if unit == "dateTimeAsIso":
        return datetime.fromtimestamp(value / 1000).strftime("%Y-%m-%d %H:%M:%S")
    for scale, suffix in UNIT_SCALES.get(unit, []):
        if abs(value) >= scale or scale == UNIT_SCALES[unit][-1][0]:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g}"


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def threshold_color(value: float, panel: Json) -> str:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    color = steps[0]["color"]
    for s in steps[1:]:
        if value >= s["value"]:
            color = s["color"]
    return {"green": "#3d9a50", "orange": "#e38b14", "red": "#d12c2c", "blue": "#3274d9"}.get(color, color)


def draw_panel(ax: Any, panel: Json, results: list[tuple[Json, str, list[dict[str, Any]]]]) -> None:
    """One panel into one matplotlib axes: lines for time series, a number for stats, text for tables,
    binned counts for heatmaps, colored bands for state timelines."""
    from matplotlib.dates import DateFormatter
    unit = str(panel["fieldConfig"]["defaults"].get("unit", ""))
    ax.set_title(panel["title"], fontsize=9, loc="left")
    if not any(series for _, _, series in results):
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#d12c2c", transform=ax.transAxes)
        ax.set_axis_off()
        return
    kind = panel["type"]
    if kind == "timeseries":
        lines = 0
        for target, _, series in results:
            for s in series:
                pts = s.get("values") or [s.get("value")]
                xs = [datetime.fromtimestamp(float(t)) for t, _ in pts]
                ys = [float(v) for _, v in pts]
                if lines < 12:
                    ax.plot(xs, ys, lw=1, label=legend(str(target.get("legendFormat", "")), s["metric"]),
                            drawstyle="steps-post" if panel["fieldConfig"]["defaults"].get("custom", {})
                            .get("lineInterpolation") == "stepAfter" else "default")
                lines += 1
        lo, hi = ax.get_ylim()
        for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
            if lo <= step["value"] <= hi * 1.25:
                ax.axhline(step["value"], ls="--", lw=0.8, color=threshold_color(step["value"], panel))
        ax.yaxis.set_major_formatter(lambda v, _pos: fmt_value(v, unit))
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="upper left", ncol=2 if lines > 6 else 1, framealpha=0.6)
        ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    elif kind == "stat":
        texts = []
        for target, _, series in results:
            for s in series[:3]:
                pts = s.get("values") or [s.get("value")]
                value = float(pts[-1][1])
                texts.append((fmt_value(value, unit), legend(str(target.get("legendFormat", "")), s["metric"]),
                              threshold_color(value, panel)))
        for i, (val, name, color) in enumerate(texts[:3]):
            y = 0.75 - i * (0.55 / max(len(texts), 1))
            ax.text(0.5, y, val, ha="center", va="center", fontsize=16, color=color, weight="bold",
                    transform=ax.transAxes)
            ax.text(0.5, y - 0.17, name, ha="center", va="center", fontsize=6, transform=ax.transAxes)
        ax.set_axis_off()
    elif kind == "heatmap":
        _draw_heatmap(ax, results, unit)
    elif kind == "state-timeline":
        _draw_state_timeline(ax, panel, results)
    else:  # table
        hidden = set()
        for t in panel.get("transformations", []):
            if t["id"] == "organize":
                hidden = set(t["options"].get("excludeByName", {}))
        rows = [s for _, _, series in results for s in series]
        cols = sorted({k for s in rows for k in s["metric"]} - hidden)[:8]
        show_value = "Value" not in hidden
        cells = [[str(s["metric"].get(c, ""))[:24] for c in cols]
                 + ([fmt_value(float(s["value"][1]), unit)] if show_value else []) for s in rows[:10]]
        tab = ax.table(cellText=cells, colLabels=cols + (["Value"] if show_value else []), loc="upper center",
                       cellLoc="left")
        tab.auto_set_font_size(False)
        tab.set_fontsize(6)
        ax.set_axis_off()


def _draw_heatmap(ax: Any, results: list[tuple[Json, str, list[dict[str, Any]]]], unit: str) -> None:
    """What Grafana's heatmap with ``calculate`` draws: per time step, how many series fall in each of
    10 value bands (darker = more series)."""
    points = [(float(t), float(v)) for _, _, series in results for s in series for t, v in s.get("values") or []]
    values = [v for _, v in points if v == v]
    if not values:
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    times = sorted({t for t, _ in points})
    column = {t: i for i, t in enumerate(times)}
    counts = [[0] * len(times) for _ in range(10)]
    for t, v in points:
        if v == v:
            counts[min(9, int((v - lo) / (hi - lo) * 10))][column[t]] += 1
    ax.imshow(counts, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
              extent=(0, len(times), lo, hi))
    ax.set_xticks([])
    ax.yaxis.set_major_formatter(lambda v, _pos: fmt_value(v, unit))
    ax.tick_params(labelsize=6)
    ax.set_xlabel(f"{len({tuple(sorted(s['metric'].items())) for _, _, ss in results for s in ss})} series, "
                  "binned", fontsize=6)


def _draw_state_timeline(ax: Any, panel: Json, results: list[tuple[Json, str, list[dict[str, Any]]]]) -> None:
    """One band per series (at most 20), each interval colored by the panel's thresholds."""
    bands = [(legend(str(target.get("legendFormat", "")), s["metric"]), s.get("values") or [])
             for target, _, series in results for s in series][:20]
    for row_index, (_, pts) in enumerate(bands):
        for (t0, v), (t1, _) in zip(pts, [*pts[1:], pts[-1]], strict=True):
            width = max(float(t1) - float(t0), 1.0)
            ax.broken_barh([(float(t0), width)], (row_index + 0.1, 0.8), color=threshold_color(float(v), panel))
    ax.set_yticks([i + 0.5 for i in range(len(bands))], [name for name, _ in bands], fontsize=5)
    ax.set_xticks([])


def render_dashboard(base: str, dash: Json, window: Window, out_dir: Path, prefer: Mapping[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variables = resolve_variables(base, dash, window, prefer)
    panels = dash["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(22, rows * 0.42 + 1))
    grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2, left=0.03, right=0.99, top=1 - 0.6 / (rows * 0.42 + 1),
                            bottom=0.01)
    chosen = ", ".join(f"{k}={v}" for k, v in variables.items() if k != "datasource")
    fig.suptitle(f"{dash['title']}   ({chosen}; {datetime.fromtimestamp(window.start):%H:%M:%S}"
                 f" to {datetime.fromtimestamp(window.end):%H:%M:%S})", fontsize=12, x=0.01, ha="left")
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"]: g["y"] + g["h"], g["x"]: g["x"] + g["w"]])
        if panel["type"] == "row":
            ax.set_axis_off()
            ax.text(0, 0.5, panel["title"], fontsize=11, weight="bold", va="center", transform=ax.transAxes)
            continue
        results = []
        for t in panel.get("targets", []):
            q = Query(dash["title"], panel["title"], t["refId"], t["expr"], bool(t.get("instant")) and not t.get("range"))
            try:
                expr, series = run(base, q, variables, window)
            except PrometheusError as exc:
                log.warning("%s / %s: %s", dash["title"], panel["title"], exc)
                expr, series = t["expr"], []
            results.append((t, expr, series))
        draw_panel(ax, panel, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dash['uid']}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def render_all(base: str, window: Window, out_dir: Path, prefer: Mapping[str, str]) -> list[Path]:
    return [render_dashboard(base, dash, window, out_dir, prefer) for dash in load_dashboards().values()]


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"duration like 90s, 15m or 1h, not {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", help="Prometheus base URL; without it, start a local demo stack")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "previews", help="folder for the PNGs")
    parser.add_argument("--range", type=parse_duration, default=None,
                        help="time range to show, e.g. 15m (default: 15m; with the demo stack: how long it runs, 45s)")
    parser.add_argument("--rate-interval", default=None, help="$__rate_interval (default: 4 x scrape interval)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="pick a template variable value, e.g. --var gpu=3 (default: All / first value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    prefer = dict(v.split("=", 1) for v in args.var)
    if args.prometheus:
        end = time.time()
        window = Window(end - (args.range or 900), end, max((args.range or 900) / 300, 1), args.rate_interval or "1m")
        paths = render_all(args.prometheus, window, args.out, prefer)
    else:
        from harness.dashboard_stack import DashboardStack

        with tempfile.TemporaryDirectory(prefix="render-dashboards-") as tmp, DashboardStack(Path(tmp)) as stack:
            stack.wait_for_data()
            # Let the lines grow: the demo shows --range of history (default 45 s), not just its first seconds.
            hold = stack.started + (args.range or 45) - time.time()
            log.info("stack ready at %s; collecting %.0f s more", stack.prometheus, max(hold, 0))
            time.sleep(max(min(hold, 3600), 0))
            window = stack.window()
            paths = render_all(stack.prometheus, window, args.out, {**stack.prefer, **prefer})
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
