"""The shipped alerting configuration, checked with the real tools: promtool (rule syntax, unit tests),
amtool (Alertmanager config, routing tree), and a live Alertmanager for the inhibitions.

Also the conventions nobody should have to review by eye: generated files match alerts/build.py,
every alert has a firing unit-test case, a runbook page and the mixin annotations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import alerts.build as build  # the rule generator
from harness.alert_stack import ALERTS_DIR, WebhookReceiver, alertmanager_config, labels_match
from harness.support import (
    REPO_ROOT,
    http_get,
    http_post_json,
    require_binary,
    start_alertmanager,
    wait_until,
)

RULE_FILES = [ALERTS_DIR / "gpu-exporter.rules.yml", ALERTS_DIR / "fast" / "gpu-exporter.rules.yml"]
UNIT_TESTS = sorted((ALERTS_DIR / "tests").glob("*.test.yml"))
AM_CONFIGS = [ALERTS_DIR / "alertmanager.yml", ALERTS_DIR / "alertmanager-fast.yml"]
RUNBOOKS = ALERTS_DIR / "runbooks"


def _rules(path: Path = RULE_FILES[0]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, rule) for every rule in a generated file."""
    doc = yaml.safe_load(path.read_text())
    return [(g["name"], r) for g in doc["groups"] for r in g["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [r for _, r in _rules() if "alert" in r]


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


# --- generated files and rule syntax ------------------------------------------------------------------


def test_generated_rule_files_match_build_output() -> None:
    for profile in build.PROFILES:
        assert build.OUTPUTS[profile].read_text() == build.render(profile), (
            f"{build.OUTPUTS[profile]} differs from alerts/build.py output: run python alerts/build.py"
        )
    assert _run(sys.executable, str(ALERTS_DIR / "build.py"), "--check").returncode == 0


def test_build_rejects_unknown_placeholder_and_bad_duration() -> None:
    config = yaml.safe_load(build.THRESHOLDS.read_text())
    with pytest.raises(build.BuildError, match="typo_name"):
        build.render("fast", template="groups: [{name: x, rules: [{record: a, expr: '${typo_name}'}]}]\n",
                     config=config)
    with pytest.raises(build.BuildError, match="not a duration"):
        build.duration_seconds("5 minutes")


def test_fast_profile_keeps_the_expressions_and_shortens_only_durations() -> None:
    prod, fast = _rules(RULE_FILES[0]), _rules(RULE_FILES[1])
    assert [(g, r.get("alert") or r.get("record"), r.get("labels")) for g, r in prod] == [
        (g, r.get("alert") or r.get("record"), r.get("labels")) for g, r in fast
    ]
    durations = re.compile(r"\b\d+[smh]\b|\b\d+\b")
    for (_, p), (_, f) in zip(prod, fast, strict=True):
        assert durations.sub("N", p["expr"]) == durations.sub("N", f["expr"]), p.get("alert") or p.get("record")


def test_promtool_check_rules() -> None:
    promtool = require_binary("promtool")
    result = _run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


@pytest.mark.slow  # ≈4 s: promtool evaluates hours of series at 1-minute steps
def test_promtool_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    assert UNIT_TESTS, "no alerts/tests/*.test.yml"
    result = _run(promtool, "test", "rules", *[p.name for p in UNIT_TESTS], cwd=ALERTS_DIR / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test_case_with_annotations() -> None:
    """Each alerting rule (each severity variant too) fires in some case with its annotations checked."""
    fired: set[tuple[str, str]] = set()
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../gpu-exporter.rules.yml"], f"{path.name} must test the shipped rules"
        for case in doc["tests"]:
            for check in case.get("alert_rule_test") or []:
                for exp in check.get("exp_alerts") or []:
                    assert {"summary", "description", "runbook_url"} <= set(exp.get("exp_annotations") or {}), (
                        f"{path.name}: {check['alertname']} case does not check its annotations"
                    )
                    fired.add((check["alertname"], exp["exp_labels"]["severity"]))
    wanted = {(a["alert"], a["labels"]["severity"]) for a in _alerts()}
    assert wanted - fired == set(), f"alerts without a firing unit-test case: {sorted(wanted - fired)}"


def test_unit_tests_cannot_pass_vacuously(tmp_path: Path) -> None:
    """promtool must reject a wrong expectation, or the suite above proves nothing."""
    promtool = require_binary("promtool")
    bad = tmp_path / "bad.test.yml"
    bad.write_text(
        f"rule_files: [{RULE_FILES[0]}]\nevaluation_interval: 1m\ntests:\n"
        "  - interval: 1m\n    input_series:\n"
        "      - series: 'gpu_exporter_nvml_up{host=\"n1\",instance=\"n1:9835\",job=\"gpu-exporter\"}'\n"
        "        values: '1x10'\n"
        "    alert_rule_test:\n      - eval_time: 5m\n        alertname: GpuNvmlDown\n"
        "        exp_alerts: [{exp_labels: {severity: critical, host: n1}}]\n"
    )
    result = _run(promtool, "test", "rules", str(bad))
    assert result.returncode != 0 and "GpuNvmlDown" in result.stdout + result.stderr


# --- conventions ---------------------------------------------------------------------------------------


def test_alerts_follow_the_mixin_conventions() -> None:
    base = yaml.safe_load(build.THRESHOLDS.read_text())["runbook_base_url"]
    for group, rule in _rules():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", group), f"group {group!r} is not kebab-case"
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            continue
        name, ann = rule["alert"], rule["annotations"]
        assert re.fullmatch(r"Gpu[A-Z][A-Za-z0-9]+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert "{{" not in ann["summary"] and ann["summary"].endswith("."), f"{name}: summary must be static"
        if name != "GpuWatchdog":  # has no labels or value to show
            assert "{{" in ann["description"], f"{name}: description must carry labels / the value"
        assert ann["runbook_url"] == f"{base}/{name}.md", name


def test_every_alert_has_a_runbook_page() -> None:
    names = {a["alert"] for a in _alerts()}
    for name in names:
        page = RUNBOOKS / f"{name}.md"
        assert page.is_file(), f"alerts/runbooks/{name}.md missing"
        text = page.read_text()
        assert text.startswith(f"# {name}\n")
        for section in ("## Meaning", "## Confirm", "## Act"):
            assert section in text, f"{page.name}: no {section!r} section"
    orphans = {p.stem for p in RUNBOOKS.glob("*.md")} - names - {"README"}
    assert not orphans, f"runbooks for alerts that do not exist: {sorted(orphans)}"


def _documented_metrics() -> set[str]:
    """Series names in docs/metrics.md's tables (``a_used_bytes` / `_free_bytes`` shorthand expanded)."""
    names: set[str] = set()
    for line in (REPO_ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        found = re.findall(r"`([a-z_][a-z0-9_]*)`", line.split("|")[1])
        for short in found:
            if short.startswith("_") and found:
                keep = found[0].split("_")[: -short.count("_")]
                names.add("_".join(keep) + short)
            else:
                names.add(short)
    return names


def test_rules_only_use_documented_metrics() -> None:
    documented = _documented_metrics()
    assert "gpu_memory_total_bytes" in documented and "training_cuda_oom_total" in documented
    for _, rule in _rules():
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # label values are not metric names
        tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
        for name in {t for t in tokens if t.startswith(("gpu_", "training_")) and ":" not in t}:
            base = re.sub(r"_(sum|count)$", "", name)  # a documented summary's series
            assert name in documented or base in documented, f"{rule.get('alert') or rule['record']}: {name}"


# --- Alertmanager: config and routing ---------------------------------------------------------------------


@pytest.mark.parametrize("config", AM_CONFIGS, ids=lambda p: p.name)
def test_amtool_check_config(config: Path) -> None:
    result = _run(require_binary("amtool"), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


ROUTES = [
    ("page", {"alertname": "GpuLost", "severity": "critical", "host": "n1", "gpu": "0"}),
    ("page", {"alertname": "GpuTrainingTokenExpired", "severity": "critical", "training_job": "j"}),
    ("ticket", {"alertname": "GpuTemperatureHigh", "severity": "warning", "host": "n1", "gpu": "0"}),
    ("ticket", {"alertname": "SomethingWithoutSeverity"}),
    ("null", {"alertname": "GpuXidApplicationError", "severity": "info"}),
    ("watchdog", {"alertname": "GpuWatchdog", "severity": "info"}),
]


@pytest.mark.parametrize("config", AM_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize(("receiver", "labels"), ROUTES, ids=[f"{r}-{lab['alertname']}" for r, lab in ROUTES])
def test_amtool_routes(config: Path, receiver: str, labels: dict[str, str]) -> None:
    amtool = require_binary("amtool")
    args = [f"{k}={v}" for k, v in labels.items()]
    result = _run(amtool, "config", "routes", "test", f"--config.file={config}", f"--verify.receivers={receiver}", *args)
    assert result.returncode == 0, f"{labels} routed to {result.stdout.strip()!r}, expected {receiver}"


def test_fast_and_production_alertmanager_configs_agree() -> None:
    """Same tree and inhibitions: the fast profile differs only in timings (and comments)."""
    prod, fast = (yaml.safe_load(p.read_text()) for p in AM_CONFIGS)
    timing = {"group_wait", "group_interval", "repeat_interval"}

    def shape(route: dict[str, Any]) -> dict[str, Any]:
        return {k: ([shape(r) for r in v] if k == "routes" else v) for k, v in route.items() if k not in timing}

    assert shape(prod["route"]) == shape(fast["route"])
    assert prod["inhibit_rules"] == fast["inhibit_rules"]
    assert [r["name"] for r in prod["receivers"]] == [r["name"] for r in fast["receivers"]]
    assert fast["route"]["group_wait"] in ("0s", "1s") and fast["route"]["group_interval"] in ("1s", "2s")


# --- live inhibition -------------------------------------------------------------------------------------


def _post_alerts(am: str, alerts: list[dict[str, str]]) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = [
        {"labels": labels, "annotations": {"summary": labels["alertname"]}, "startsAt": now,
         "generatorURL": "http://prometheus.invalid/graph"}
        for labels in alerts
    ]
    status, text = http_post_json(am + "/api/v2/alerts", body)
    assert status == 200, text


@pytest.mark.slow
def test_inhibitions_on_a_live_alertmanager(log_dir: Path) -> None:
    """Post alerts to the real Alertmanager (fast config): inhibited ones are suppressed and never
    notified, their causes are delivered to the right receiver."""
    common = {"instance": "n1:9835", "job": "gpu-exporter", "host": "n1"}
    lost = {"alertname": "GpuLost", "severity": "critical", "gpu": "0", **common}
    xid = {"alertname": "GpuXidHardwareError", "severity": "critical", "gpu": "0", "xid": "79", **common}
    hot_on_lost = {"alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "0", **common}
    hot_other = {"alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "1", **common}
    hot_crit = {"alertname": "GpuTemperatureHigh", "severity": "critical", "gpu": "2", **common}
    hot_warn = {"alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "2", **common}
    train = {"training_job": "resnet", "rank": "0", "service": "dataset", **common}
    expired = {"alertname": "GpuTrainingTokenExpired", "severity": "critical", **train}
    refused = {"alertname": "GpuTrainingAuthFailures", "severity": "warning", "status_code": "401", **train}
    stale = {"alertname": "GpuExporterStale", "severity": "warning", "instance": "n2:9835", "host": "n2",
             "job": "gpu-exporter"}
    hot_stale = {"alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "0", "host": "n2",
                 "instance": "n2:9835", "job": "gpu-exporter"}
    # The driver wants GPU 3 reset: its XID and NVLink alerts are symptoms of that, not news.
    reset = {"alertname": "GpuRecoveryActionRequired", "severity": "critical", "gpu": "3", "action": "gpu_reset",
             **common}
    xid_on_reset = {"alertname": "GpuXidHardwareError", "severity": "critical", "gpu": "3", "xid": "48", **common}
    link_on_reset = {"alertname": "GpuNvlinkDown", "severity": "warning", "gpu": "3", "link": "5", **common}
    expect_suppressed = [hot_on_lost, hot_warn, refused, hot_stale, xid_on_reset, link_on_reset]
    expect_delivered = [("page", lost), ("page", xid), ("ticket", hot_other), ("page", hot_crit),
                        ("page", expired), ("ticket", stale), ("page", reset)]

    webhook = WebhookReceiver().start()
    try:
        cfg = log_dir / "alertmanager.yml"
        cfg.write_text(alertmanager_config(webhook.url))
        am_proc, am = start_alertmanager(log_dir, cfg)
        try:
            # Sources first, so no target is ever notified before its inhibitor is known.
            _post_alerts(am, [lost, xid, hot_crit, expired, stale, reset])
            _post_alerts(am, [hot_on_lost, hot_other, hot_warn, refused, hot_stale, xid_on_reset, link_on_reset])

            def key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
                return tuple(sorted(labels.items()))

            def states() -> dict[tuple[tuple[str, str], ...], dict[str, Any]] | None:
                status, text = http_get(am + "/api/v2/alerts")
                got = {key(a["labels"]): a["status"] for a in json.loads(text)} if status == 200 else {}
                return got if len(got) == 13 else None

            got = wait_until(states, timeout=10, message="13 alerts in Alertmanager")
            for labels in expect_suppressed:
                assert got[key(labels)]["state"] == "suppressed" and got[key(labels)]["inhibitedBy"], labels
            for _, labels in expect_delivered:
                assert got[key(labels)]["state"] == "active", labels

            for path, labels in expect_delivered:
                note, _ = webhook.wait_for_alert(labels_match(**labels), timeout=15)
                assert note.path == f"/{path}", (labels["alertname"], note.path)
            # Every group is flushed after group_wait (1 s); by the time the delivered ones arrived, an
            # uninhibited target would have been sent in the same round.
            time.sleep(1.5)
            delivered = [a["labels"] for n in webhook.notifications() for a in n.alerts()]
            for labels in expect_suppressed:
                assert labels not in delivered, f"inhibited alert was notified: {labels}"
        finally:
            am_proc.stop()
    finally:
        webhook.stop()
