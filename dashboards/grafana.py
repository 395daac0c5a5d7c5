"""Small builders for Grafana dashboard JSON (schema 39, Grafana 10.4+ / 11 / 12).

Plain dicts instead of an SDK: the three dashboards need a handful of panel kinds, and a builder we
own keeps the committed JSON stable (no SDK defaults changing under us) and easy to review.
Every panel and query uses the ``datasource`` template variable, so the same JSON imports into any
Grafana and provisions from files without ``__inputs``.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 39
TAG = "gpu-exporter"
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

# Dashboard uids; the links between the three dashboards use them.
FLEET_UID = "gpu-exporter-fleet"
GPU_UID = "gpu-exporter-gpu"
TRAINING_UID = "gpu-exporter-training"
FLEET_ROLLUP_UID = "gpu-exporter-fleet-rollup"

Json = dict[str, Any]


def thresholds(*steps: tuple[float, str], base: str = "green") -> Json:
    """Absolute thresholds: ``base`` below the first step, then each (value, color)."""
    return {
        "mode": "absolute",
        "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for v, c in steps],
    }


def target(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False
) -> Json:
    """One Prometheus query. ``table`` queries are instant and keep their labels as columns."""
    t: Json = {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not (instant or table),
        "instant": instant or table,
    }
    if table:
        t["format"] = "table"
    return t


def _with_refs(targets: list[Json]) -> list[Json]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return targets


def _field_config(unit: str, thr: Json, *, minimum: float | None, maximum: float | None, links: list[Json],
                  custom: Json | None = None) -> Json:
    defaults: Json = {"unit": unit, "thresholds": thr, "color": {"mode": "palette-classic"}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if links:
        defaults["links"] = links
    if custom is not None:
        defaults["custom"] = custom
    return {"defaults": defaults, "overrides": []}


def timeseries(
    title: str,
    targets: list[Json],
    *,
    unit: str,
    thr: Json,
    description: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    stacked: bool = False,
    stepped: bool = False,
    links: list[Json] | None = None,
    w: int = 12,
    h: int = 8,
) -> Json:
    """A time series panel; thresholds are drawn as dashed lines so limits are visible on the graph."""
    custom: Json = {
        "drawStyle": "line",
        "lineInterpolation": "stepAfter" if stepped else "linear",
        "lineWidth": 1,
        "fillOpacity": 10 if stacked else 0,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        "thresholdsStyle": {"mode": "dashed"},
        "axisSoftMin": 0,
    }
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": _field_config(unit, thr, minimum=minimum, maximum=maximum, links=links or [],
                                     custom=custom),
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "gridPos": {"w": w, "h": h},
    }


def stat(
    title: str,
    targets: list[Json],
    *,
    unit: str,
    thr: Json,
    description: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    links: list[Json] | None = None,
    w: int = 4,
    h: int = 4,
) -> Json:
    """A single-number panel (last value), colored by its thresholds."""
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": _field_config(unit, thr, minimum=minimum, maximum=maximum, links=links or []),
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        },
        "gridPos": {"w": w, "h": h},
    }


def table(
    title: str,
    targets: list[Json],
    *,
    unit: str,
    thr: Json,
    description: str = "",
    links: list[Json] | None = None,
    hide: tuple[str, ...] = ("Time",),
    w: int = 24,
    h: int = 8,
) -> Json:
    """An instant-query table; several queries are merged on their shared labels."""
    transformations: list[Json] = []
    if len(targets) > 1:
        transformations.append({"id": "merge", "options": {}})
    transformations.append(
        {"id": "organize", "options": {"excludeByName": dict.fromkeys(hide, True), "renameByName": {}}}
    )
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "transformations": transformations,
        "fieldConfig": _field_config(unit, thr, minimum=None, maximum=None, links=links or [],
                                     custom={"align": "auto", "cellOptions": {"type": "color-text"}}),
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        "gridPos": {"w": w, "h": h},
    }


def heatmap(title: str, targets: list[Json], *, unit: str, description: str = "", w: int = 12,
            h: int = 8) -> Json:
    """A heatmap Grafana buckets itself from many series (one per host): the distribution over time,
    readable whatever the number of series, where one line per series is not."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": _field_config(unit, thresholds(), minimum=None, maximum=None, links=[]),
        "options": {
            "calculate": True,
            "calculation": {"yBuckets": {"mode": "count", "value": "10"}},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": True},
            "legend": {"show": True},
        },
        "gridPos": {"w": w, "h": h},
    }


def state_timeline(title: str, targets: list[Json], *, unit: str, thr: Json, description: str = "",
                   w: int = 24, h: int = 8) -> Json:
    """One band per series, colored by its thresholds: which host was in which state when."""
    return {
        "type": "state-timeline",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _with_refs(targets),
        "fieldConfig": _field_config(unit, thr, minimum=None, maximum=None, links=[],
                                     custom={"fillOpacity": 80, "lineWidth": 0}),
        "options": {"mergeValues": True, "showValue": "never", "alignValue": "left", "rowHeight": 0.9,
                    "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "single", "sort": "none"}},
        "gridPos": {"w": w, "h": h},
    }


def row(title: str) -> Json:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[Json]) -> list[Json]:
    """Assign ids and grid positions left to right, wrapping at 24 columns; rows start a new line."""
    x = y = line_h = 0
    for pid, p in enumerate(panels, start=1):
        p["id"] = pid
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        line_h = max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return panels


def datasource_var() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_var(name: str, label: str, query: str, *, multi: bool, include_all: bool) -> Json:
    """A variable filled from ``label_values(...)``; refreshed when the time range changes."""
    v: Json = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "current": {},
        "hide": 0,
        "includeAll": include_all,
        "multi": multi,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 3,
    }
    if include_all:
        v["allValue"] = ".*"
    return v


def dashboard_links(own_uid: str) -> list[Json]:
    """Links to the other two dashboards, carrying the time range and the variables across."""
    titles = {FLEET_UID: "Fleet", GPU_UID: "GPU detail", TRAINING_UID: "Training job",
              FLEET_ROLLUP_UID: "Fleet roll-up"}
    return [
        {
            "title": title,
            "type": "link",
            "url": f"/d/{uid}",
            "icon": "dashboard",
            "includeVars": True,
            "keepTime": True,
            "targetBlank": False,
            "asDropdown": False,
            "tags": [],
            "tooltip": f"Open the {title} dashboard",
        }
        for uid, title in titles.items()
        if uid != own_uid
    ]


def gpu_detail_link(host: str, gpu: str) -> Json:
    """A data link from a per-GPU row or series to the GPU detail dashboard for that GPU."""
    return {
        "title": "GPU detail",
        "url": f"/d/{GPU_UID}?var-datasource=${{datasource}}&var-host={host}&var-gpu={gpu}&${{__url_time_range}}",
    }


def training_link(job: str) -> Json:
    return {
        "title": "Training job " + job,
        "url": f"/d/{TRAINING_UID}?var-datasource=${{datasource}}&var-training_job={job}&${{__url_time_range}}",
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[Json],
    panels: list[Json],
    annotations: list[Json] | None = None,
) -> Json:
    builtin: Json = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "id": None,
        "links": dashboard_links(uid),
        "annotations": {"list": [builtin, *(annotations or [])]},
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout(panels),
    }
