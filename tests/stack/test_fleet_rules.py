"""The fleet roll-ups (alerts/fleet.rules.yml), checked with the real tools: the file is what
alerts/build.py generates, promtool accepts it and its unit tests pass (and can fail), and vmalert,
which evaluates every shipped rule file in deploy/fleet/, accepts them all (MetricsQL is not PromQL).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

import alerts.build as build  # the rule generator
from harness.alert_stack import ALERTS_DIR
from harness.support import require_binary

FLEET_RULES = ALERTS_DIR / "fleet.rules.yml"
FLEET_TESTS = ALERTS_DIR / "tests" / "fleet"
SHIPPED_RULES = [ALERTS_DIR / "gpu-exporter.rules.yml", ALERTS_DIR / "fast" / "gpu-exporter.rules.yml", FLEET_RULES]


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def test_fleet_rules_are_generated_and_record_only() -> None:
    assert FLEET_RULES.read_text() == build.render("production", source=build.FLEET_SOURCE), (
        "alerts/fleet.rules.yml differs from alerts/build.py output: run python alerts/build.py"
    )
    rules = [r for g in yaml.safe_load(FLEET_RULES.read_text())["groups"] for r in g["rules"]]
    assert rules and all("record" in r and "alert" not in r for r in rules)
    # Named level:metric:operations, and no job-level roll-up splits a job by node.
    for r in rules:
        assert r["record"].count(":") == 2, r["record"]
        if r["record"].startswith("training_job:"):
            assert "host" not in r["expr"] or "by (training_job, host)" in r["expr"], r


def test_promtool_checks_and_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    checked = _run(promtool, "check", "rules", str(FLEET_RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted(p.name for p in FLEET_TESTS.glob("*.test.yml"))
    assert tests
    result = _run(promtool, "test", "rules", *tests, cwd=FLEET_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cannot_pass_vacuously(tmp_path: Path) -> None:
    """A wrong expectation (one value changed) must fail, or the suite above proves nothing."""
    promtool = require_binary("promtool")
    text = (FLEET_TESTS / "rollups.test.yml").read_text()
    wrong = text.replace("value: 600}", "value: 601}").replace("../../fleet.rules.yml", str(FLEET_RULES))
    assert wrong != text
    bad = tmp_path / "bad.test.yml"
    bad.write_text(wrong)
    result = _run(promtool, "test", "rules", str(bad))
    assert result.returncode != 0 and "training_last_progress_age_seconds" in result.stdout + result.stderr


def test_vmalert_accepts_every_shipped_rule_file() -> None:
    vmalert = require_binary("vmalert")
    for path in SHIPPED_RULES:
        result = _run(vmalert, "-dryRun", f"-rule={path}")
        assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
    # ...and it does reject a broken one.
    broken = _run(vmalert, "-dryRun", f"-rule={ALERTS_DIR / 'thresholds.yml'}")
    assert broken.returncode != 0
