"""Run a dashboard's queries against a live Prometheus the way Grafana would.

Template variables are resolved through the Prometheus HTTP API from their own ``label_values``
queries, in declaration order (so ``$gpu`` sees the chosen ``$host``): multi-value variables with
"All" get their ``allValue`` (Grafana's default selection), single-value ones the preferred value when
it exists, else the first. Used by tests/stack/test_dashboards_live.py and scripts/render_dashboards.py (python -m scripts.render_dashboards).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dashboards.grafana import Json
from dashboards.queries import (
    Query,
    builtin_values,
    iter_queries,
    parse_label_values,
    query_variables,
    regex_value,
    substitute,
    variable_query,
)


class PrometheusError(RuntimeError):
    """Prometheus refused a query (bad PromQL, unreachable): the message carries its answer."""


def prom_api(base: str, path: str, params: Mapping[str, Any] | list[tuple[str, Any]], timeout: float = 10.0) -> Any:
    """GET ``/api/v1/<path>`` and return its ``data``; raise PrometheusError otherwise."""
    url = f"{base.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        raise PrometheusError(f"{path} {dict(params)!r}: HTTP {err.code}: {err.read().decode()[:500]}") from err
    except (urllib.error.URLError, OSError) as err:
        raise PrometheusError(f"{path}: {err}") from err
    if body.get("status") != "success":
        raise PrometheusError(f"{path} {dict(params)!r}: {body}")
    return body["data"]


@dataclass(frozen=True)
class Window:
    """The time range a dashboard is looked at, with Grafana's interval variables for it."""

    start: float
    end: float
    step: float
    rate_interval: str

    @property
    def builtins(self) -> dict[str, str]:
        rng = max(int(self.end - self.start), 1)
        return builtin_values(self.rate_interval, rng, f"{int(self.step)}s")


def label_values(base: str, selector: str | None, label: str, window: Window) -> list[str]:
    params: list[tuple[str, Any]] = [("start", window.start), ("end", window.end)]
    if selector:
        params.append(("match[]", selector))
    return sorted(str(v) for v in prom_api(base, f"label/{label}/values", params))


def resolve_variables(
    base: str, dash: Json, window: Window, prefer: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Values (ready for ``=~``) of every variable of ``dash``; KeyError names an empty variable."""
    prefer = prefer or {}
    out: dict[str, str] = {"datasource": "prometheus"}
    for var in query_variables(dash):
        selector, label = parse_label_values(variable_query(var))
        if selector:
            selector = substitute(selector, out, window.builtins)
        values = label_values(base, selector, label, window)
        if not values:
            raise KeyError(f"{dash.get('title')}: variable ${var['name']} ({variable_query(var)}) has no values")
        name = str(var["name"])
        if var.get("includeAll"):
            out[name] = str(var.get("allValue") or regex_value(values))
        else:
            out[name] = regex_value([prefer[name] if prefer.get(name) in values else values[0]])
    return out


def run(base: str, query: Query, variables: Mapping[str, str], window: Window) -> tuple[str, list[dict[str, Any]]]:
    """(the PromQL as sent, its result series). Instant queries at ``window.end``, others over the window."""
    expr = substitute(query.expr, variables, window.builtins)
    if query.instant:
        data = prom_api(base, "query", {"query": expr, "time": window.end})
    else:
        data = prom_api(base, "query_range",
                        {"query": expr, "start": window.start, "end": window.end, "step": window.step})
    return expr, list(data.get("result", []))


def empty_queries(
    base: str, dash: Json, window: Window, prefer: Mapping[str, str] | None = None
) -> list[str]:
    """One line per query of ``dash`` that returns no data (or fails): dashboard, panel, query."""
    try:
        variables = resolve_variables(base, dash, window, prefer)
    except (KeyError, PrometheusError) as exc:
        return [str(exc)]
    problems = []
    for q in iter_queries(dash):
        try:
            expr, result = run(base, q, variables, window)
        except PrometheusError as exc:
            problems.append(f"{q.dashboard} / {q.panel} / {q.ref}: query failed: {exc}")
            continue
        if not result:
            problems.append(f"{q.dashboard} / {q.panel} / {q.ref}: no data for {expr}")
    return problems
