"""Walk the queries of a dashboard and substitute its template variables the way Grafana does.

Shared by the live test (every query must return data from a real Prometheus) and the PNG renderer,
so both run exactly the PromQL a Grafana user would see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboards.grafana import Json

DASHBOARD_DIR = Path(__file__).resolve().parent
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it lives, for error messages a reviewer can act on."""

    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool


def load_dashboards(folder: Path = DASHBOARD_DIR) -> dict[str, Json]:
    """The committed dashboards by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def data_panels(dash: Json) -> Iterator[Json]:
    """Every panel that queries data (rows are layout only), including panels nested in rows."""
    for panel in dash.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def iter_queries(dash: Json) -> Iterator[Query]:
    """Panel targets, then Prometheus annotation queries."""
    title = str(dash.get("title"))
    for panel in data_panels(dash):
        for t in panel.get("targets", []):
            yield Query(title, str(panel.get("title")), str(t.get("refId")), str(t.get("expr", "")),
                        bool(t.get("instant")) and not t.get("range"))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            yield Query(title, f"annotation {ann.get('name')}", "-", str(ann["expr"]), False)


def query_variables(dash: Json) -> list[Json]:
    """The template variables filled by a query, in dependency (declaration) order."""
    return [v for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"]


def variable_query(var: Json) -> str:
    q = var.get("query")
    return str(q.get("query") if isinstance(q, Mapping) else q)


def parse_label_values(query: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> (selector or None, label); ValueError for anything else."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"unsupported variable query {query!r} (only label_values(...) is used)")
    return m.group(1), m.group(2)


def regex_value(values: list[str]) -> str:
    """A selection as Grafana puts it into a ``=~`` matcher: escaped, alternatives in a group."""
    escaped = [_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: Mapping[str, str], builtins: Mapping[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` with values; unknown names raise KeyError (a typo in a query)."""
    values: dict[str, Any] = {**builtins, **variables}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"undefined template variable ${name} in {expr!r}")
        return str(values[name])

    return _VAR.sub(repl, expr)


def builtin_values(rate_interval: str, range_seconds: int, interval: str) -> dict[str, str]:
    """Grafana's built-in interval variables as fixed strings."""
    return {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": f"{range_seconds}s",
        "__range_s": str(range_seconds),
    }
