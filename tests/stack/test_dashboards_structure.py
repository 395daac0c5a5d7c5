"""Structural rules for the dashboards, mirroring grafana's dashboard-linter (a Go tool not available
here): committed JSON == generated, one datasource variable used everywhere, titles/units/thresholds,
``$__rate_interval`` in rates, counters only inside rate/increase, no hard-coded host or GPU, metric
names from docs/metrics.md, links between the dashboards, provisioning files that point at them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.definitions import DASHBOARDS
from dashboards.generate import generated
from dashboards.grafana import DATASOURCE, FLEET_ROLLUP_UID, FLEET_UID, GPU_UID, TRAINING_UID
from dashboards.queries import (
    Query,
    builtin_values,
    data_panels,
    iter_queries,
    load_dashboards,
    parse_label_values,
    query_variables,
    substitute,
    variable_query,
)
from harness.support import REPO_ROOT

DASHBOARDS_JSON = load_dashboards()
UIDS = {FLEET_UID, GPU_UID, TRAINING_UID, FLEET_ROLLUP_UID}
REQUIRED_VARS = {
    "fleet.json": {"datasource", "host", "gpu"},
    "gpu-detail.json": {"datasource", "host", "gpu"},
    "training-job.json": {"datasource", "host", "rank", "training_job"},
    "fleet-rollup.json": {"datasource", "model"},
}
# The one dashboard built on recording rules (the fleet roll-ups); the others read raw series only.
ROLLUP_DASHBOARD = "fleet-rollup.json"
# Labels that identify one machine, GPU, process or job: never a literal value in a dashboard query.
IDENTITY_LABELS = {"host", "gpu", "uuid", "pci_bus_id", "serial", "pid", "training_job", "rank"}
RANGE_FUNCS = {"rate", "irate", "increase"}
# The one raw-counter form allowed: a series born within the interval counts with its whole value,
# next to increase() of the same selector (dashboards.definitions._new_or_increase). Normalised to the
# increase() it stands beside before the counter rules run, so nothing else slips through.
NEW_OR_INCREASE = re.compile(
    r"\(\((\w+\{[^{}]*\}) unless \1 offset \$__rate_interval\) or (increase\(\1\[\$__rate_interval\]\))\)"
)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}
PROM_BUILTIN_SERIES = {"ALERTS", "ALERTS_FOR_STATE", "up"}


def metric_contract() -> tuple[set[str], set[str]]:
    """(every series name, counter-like names) from the tables in docs/metrics.md."""
    names: set[str] = set()
    counters: set[str] = set()
    in_metric_table = False
    for line in (REPO_ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["name", "type"]:
            in_metric_table = True
        elif not line.startswith("|"):
            in_metric_table = False
        if not in_metric_table or len(cells) < 3 or not cells[0].startswith("`"):
            continue
        found = re.findall(r"`([a-zA-Z_:][\w:]*)`", cells[0])
        if not found or not found[0][0].isalpha():
            continue
        first = found[0]
        row_names = [first]
        for short in found[1:]:
            if short.startswith("_"):  # `gpu_memory_used_bytes` / `_free_bytes`: replace as many words
                keep = first.split("_")[: -(short.count("_"))]
                row_names.append("_".join(keep) + short)
            else:
                row_names.append(short)
        kind = cells[1]
        for n in row_names:
            if kind.startswith("summary") or kind.startswith("histogram"):
                names.update({n, n + "_sum", n + "_count"})
                counters.update({n + "_sum", n + "_count"})
            else:
                names.add(n)
                if kind.startswith("counter"):
                    counters.add(n)
    return names, counters


METRICS, COUNTERS = metric_contract()


def recorded_names() -> set[str]:
    """Series the shipped recording rules (alerts/*.rules.yml) write."""
    return {
        rule["record"]
        for path in (REPO_ROOT / "alerts").glob("*.rules.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


RECORDED = recorded_names()


def all_queries() -> Iterator[tuple[str, Query]]:
    for fname, dash in DASHBOARDS_JSON.items():
        for q in iter_queries(dash):
            yield fname, q
        for var in query_variables(dash):
            yield fname, Query(str(dash["title"]), f"variable {var['name']}", "-", variable_query(var), True)


QUERIES = list(all_queries())
QUERY_IDS = [f"{q.dashboard}/{q.panel}/{q.ref}" for _, q in QUERIES]


def _blank_strings_and_braces(expr: str) -> str:
    """Same length as ``expr`` with string literals and ``{...}`` matcher bodies blanked out."""
    out = list(expr)
    i, depth, quote = 0, 0, ""
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                out[i] = out[i + 1] = " "
                i += 2
                continue
            if c == quote:
                quote = ""
            out[i] = " "
        elif c in "\"'`":
            quote = c
            out[i] = " "
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth:
            out[i] = " "
        i += 1
    return "".join(out)


def metric_occurrences(expr: str) -> list[tuple[str, int, int]]:
    """(metric name, start, end) for each series selector in ``expr`` (label lists and functions skipped)."""
    blank = _blank_strings_and_braces(expr)
    # Grouping label lists: by (...), on (...), etc.
    blank = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                   lambda m: m.group(1) + " " * (len(m.group(0)) - len(m.group(1))), blank)
    blank = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group(0)), blank)
    out = []
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)", blank):
        name = m.group(1)
        rest = blank[m.end():].lstrip()
        if name in KEYWORDS or rest.startswith("(") or re.match(r"(by|without)\b", rest):
            continue
        out.append((name, m.start(), m.end()))
    return out


def enclosing_function(expr: str, pos: int) -> str:
    """Name of the innermost function call whose parentheses contain position ``pos``."""
    depth = 0
    blank = _blank_strings_and_braces(expr)
    for i in range(pos - 1, -1, -1):
        if blank[i] == ")":
            depth += 1
        elif blank[i] == "(":
            if depth == 0:
                m = re.search(r"([a-zA-Z_]\w*)\s*$", blank[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) for every matcher inside ``{...}``."""
    return re.findall(r"(\w+)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"", expr)


def test_committed_json_is_what_the_code_generates() -> None:
    expected = generated()
    assert set(DASHBOARDS_JSON) == set(expected) == set(DASHBOARDS)
    for name, text in expected.items():
        assert (REPO_ROOT / "dashboards" / name).read_text() == text, (
            f"dashboards/{name} differs from dashboards/definitions.py: run python -m dashboards.generate"
        )


def test_dashboards_have_unique_uids_and_titles() -> None:
    uids = [d["uid"] for d in DASHBOARDS_JSON.values()]
    titles = [d["title"] for d in DASHBOARDS_JSON.values()]
    assert sorted(uids) == sorted(UIDS)
    assert len(set(titles)) == len(UIDS)
    for d in DASHBOARDS_JSON.values():
        assert d["schemaVersion"] >= 36, "current Grafana schema"
        assert d.get("id") is None, "a fixed numeric id breaks import/provisioning"
        assert "gpu-exporter" in d["tags"]


@pytest.mark.parametrize("fname", sorted(DASHBOARDS_JSON))
def test_panels_ids_titles_units_thresholds_datasource(fname: str) -> None:
    dash = DASHBOARDS_JSON[fname]
    ids = [p["id"] for p in dash["panels"]] + [c["id"] for p in dash["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
    problems = []
    for p in dash["panels"]:
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24 or g["w"] <= 0 or g["h"] <= 0:
            problems.append(f"{p['title']}: gridPos {g} outside the 24-column grid")
    panels = list(data_panels(dash))
    assert len(panels) >= 8
    for p in panels:
        where = f"{fname} panel {p.get('title')!r}"
        if not p.get("title"):
            problems.append(f"{where}: no title")
        if p.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource {p.get('datasource')} is not the $datasource variable")
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        if not defaults.get("unit"):
            problems.append(f"{where}: no unit")
        steps = defaults.get("thresholds", {}).get("steps", [])
        if not steps or steps[0].get("value") is not None:
            problems.append(f"{where}: thresholds missing (need a base step)")
        values = [s["value"] for s in steps[1:]]
        if values != sorted(values):
            problems.append(f"{where}: threshold steps not ascending")
        targets = p.get("targets", [])
        if not targets:
            problems.append(f"{where}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: duplicate refIds")
        for t in targets:
            if t.get("datasource") != DATASOURCE:
                problems.append(f"{where} query {t.get('refId')}: datasource is not $datasource")
            if not str(t.get("expr", "")).strip():
                problems.append(f"{where} query {t.get('refId')}: empty expr")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("fname", sorted(DASHBOARDS_JSON))
def test_template_variables(fname: str) -> None:
    dash = DASHBOARDS_JSON[fname]
    variables = dash["templating"]["list"]
    names = [v["name"] for v in variables]
    assert len(names) == len(set(names))
    ds_vars = [v for v in variables if v["type"] == "datasource"]
    assert len(ds_vars) == 1 and ds_vars[0]["name"] == "datasource" and ds_vars[0]["query"] == "prometheus"
    assert REQUIRED_VARS[fname] <= set(names), f"{fname}: missing variables {REQUIRED_VARS[fname] - set(names)}"
    used = " ".join(q.expr for f, q in QUERIES if f == fname)
    for v in query_variables(dash):
        assert v["datasource"] == DATASOURCE, f"{fname} variable {v['name']}: not on $datasource"
        selector, _label = parse_label_values(variable_query(v))
        assert selector is not None, f"{fname} variable {v['name']}: label_values without a metric"
        assert v["refresh"] == 2, f"{fname} variable {v['name']}: refresh on time range change"
        assert re.search(rf"\$\{{?{v['name']}\b", used), f"{fname}: variable ${v['name']} is used by no query"
        if v.get("includeAll"):
            assert v.get("allValue") == ".*", "All must match every value, not a list built in the browser"
    # A variable may only refer to variables declared before it (Grafana resolves them in order).
    for i, v in enumerate(variables):
        for ref in re.findall(r"\$\{?(\w+)", variable_query(v) if v["type"] == "query" else ""):
            assert ref in names[:i], f"{fname} variable {v['name']} uses ${ref} declared later or nowhere"


@pytest.mark.parametrize(("fname", "query"), QUERIES, ids=QUERY_IDS)
def test_query_rules(fname: str, query: Query) -> None:
    expr = query.expr
    if query.panel.startswith("variable"):
        expr = parse_label_values(expr)[0] or ""
    where = f"{query.dashboard} / {query.panel} / {query.ref}: {expr}"
    dash = DASHBOARDS_JSON[fname]
    declared = {v["name"] for v in dash["templating"]["list"]}
    builtins = set(builtin_values("1m", 60, "1m"))
    for ref in re.findall(r"\$\{?(\w+)", expr):
        assert ref in declared | builtins, f"{where}: undefined variable ${ref}"
    # Ranges only from Grafana's interval variables: $__rate_interval for rates, $__range for totals.
    for fn, rng in re.findall(r"\b(\w+)\s*\((?:[^()\[]|\([^()]*\))*\[([^\]]*)\]", expr):
        if fn in {"rate", "irate"}:
            assert rng == "$__rate_interval", f"{where}: {fn}() must use [$__rate_interval], not [{rng}]"
        elif fn == "increase":
            assert rng in {"$__rate_interval", "$__range"}, f"{where}: increase() over [{rng}]"
    for rng in re.findall(r"\[([^\]]*)\]", expr):
        assert rng.startswith("$__"), f"{where}: hard-coded range [{rng}]"
    expr = NEW_OR_INCREASE.sub(r"\2", expr)
    for name, start, end in metric_occurrences(expr):
        known = METRICS | PROM_BUILTIN_SERIES | (RECORDED if fname == ROLLUP_DASHBOARD else set())
        assert name in known, f"{where}: {name} is not in docs/metrics.md"
        if name in COUNTERS:
            after = _blank_strings_and_braces(expr)[end:]
            assert re.match(r"\s*(\{\s*\})?\s*\[", after), (
                f"{where}: counter {name} used without a range (aggregate counters only after rate/increase)"
            )
            fn = enclosing_function(expr, start)
            assert fn in RANGE_FUNCS, f"{where}: counter {name} inside {fn or 'nothing'}(), not rate/increase"
    for label, op, value in label_matchers(expr):
        if label in IDENTITY_LABELS:
            assert op == "=~" and f"${label}" in value, (
                f"{where}: {label}{op}{value!r} is hard-coded; use {label}=~\"${label}\""
            )
    if not query.panel.startswith("variable"):
        assert "$datasource" not in expr


def test_queries_parse_in_prometheus(tmp_path: Path) -> None:
    """promtool parses every query (variables filled in) as a recording rule: a typo fails here."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed; scripts/setup.sh installs the prometheus package"
    fill = {"datasource": "x", "host": "h", "gpu": "0", "training_job": "j", "rank": "0", "model": "m"}
    builtins = builtin_values("1m", 3600, "30s")
    rules = []
    for i, (_, q) in enumerate(QUERIES):
        expr = q.expr
        if q.panel.startswith("variable"):
            expr = parse_label_values(expr)[0] or "up"
        rules.append({"record": f"dashboard_query_{i}", "expr": substitute(expr, fill, builtins)})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        bad = [f"{QUERIES[int(i)][1].dashboard} / {QUERIES[int(i)][1].panel}: {QUERIES[int(i)][1].expr}"
               for i in sorted(set(re.findall(r"dashboard_query_(\d+)", proc.stdout + proc.stderr)))]
        raise AssertionError(f"promtool rejects dashboard queries:\n{proc.stdout}{proc.stderr}\n" + "\n".join(bad))


def test_links_between_the_dashboards() -> None:
    for fname, dash in DASHBOARDS_JSON.items():
        linked = {re.sub(r"^/d/([\w-]+).*", r"\1", link["url"]) for link in dash["links"]}
        assert linked == UIDS - {dash["uid"]}, f"{fname}: links {linked}"
        for link in dash["links"]:
            assert link["keepTime"] and link["includeVars"], f"{fname}: link {link['title']} drops context"
        for p in data_panels(dash):
            for dl in p["fieldConfig"]["defaults"].get("links", []):
                uid = re.sub(r"^/d/([\w-]+).*", r"\1", dl["url"])
                assert uid in UIDS, f"{fname} panel {p['title']}: data link to unknown dashboard {uid}"
    # GPU detail is reachable from per-GPU panels; the training dashboard from the GPU detail.
    def link_targets(dash: dict[str, Any]) -> set[str]:
        return {re.sub(r"^/d/([\w-]+).*", r"\1", dl["url"]) for p in data_panels(dash)
                for dl in p["fieldConfig"]["defaults"].get("links", [])}

    assert GPU_UID in link_targets(DASHBOARDS_JSON["fleet.json"])
    assert GPU_UID in link_targets(DASHBOARDS_JSON["training-job.json"])
    assert TRAINING_UID in link_targets(DASHBOARDS_JSON["gpu-detail.json"])


def test_oom_annotation_and_required_panels() -> None:
    titles = {f: {p["title"] for p in data_panels(d)} for f, d in DASHBOARDS_JSON.items()}
    assert {"GPU utilization", "Memory used", "Temperature", "Throttled GPUs by reason", "XID errors",
            "ECC errors", "GPUs down", "Firing alerts", "Idle but allocated GPUs",
            "Energy used (time range)"} <= titles["fleet.json"]
    assert {"Clocks", "Throttle reasons", "Temperature against thresholds", "Memory by process",
            "Memory by container", "Memory by training job", "PCIe throughput", "XID errors"} <= titles["gpu-detail.json"]
    assert {"Step time per rank", "Throughput", "Loss", "Allocator memory against card memory",
            "Auth failures", "Token time to expiry", "GPUs the job runs on"} <= titles["training-job.json"]
    anns = DASHBOARDS_JSON["training-job.json"]["annotations"]["list"]
    oom = [a for a in anns if "oom" in a.get("expr", "")]
    assert oom and oom[0]["datasource"] == DATASOURCE and oom[0]["enable"]


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = REPO_ROOT / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and "http://prometheus:9090" in source["url"]
    assert source["jsonData"]["timeInterval"], "scrape interval, for $__rate_interval"
    dp = yaml.safe_load((prov / "dashboards" / "gpu-exporter.yml").read_text())
    (provider,) = dp["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith("/"), "a path inside the Grafana container"
    compose_hint = (REPO_ROOT / "deploy" / "grafana" / "README.md").read_text()
    assert path in compose_hint, "deploy/grafana/README.md says where to mount dashboards/"


def test_new_series_idiom_is_strict() -> None:
    """Only the exact form passes as an increase(): a different selector or range is still a raw counter."""
    sel = 'gpu_xid_errors_total{gpu=~"$gpu"}'
    ok = f"(({sel} unless {sel} offset $__rate_interval) or increase({sel}[$__rate_interval]))"
    assert NEW_OR_INCREASE.sub(r"\2", ok) == f"increase({sel}[$__rate_interval])"
    other = 'gpu_xid_errors_total{gpu=~".*"}'
    for bad in (
        f"(({sel} unless {other} offset $__rate_interval) or increase({sel}[$__rate_interval]))",
        f"(({sel} unless {sel} offset 1h) or increase({sel}[$__rate_interval]))",
    ):
        assert NEW_OR_INCREASE.sub(r"\2", bad) == bad
