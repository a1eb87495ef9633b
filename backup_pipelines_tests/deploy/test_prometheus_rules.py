"""The shipped Prometheus alert rules: valid, unit-tested with promtool, using our metric names."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from backup_pipelines.engine.metrics import TargetMetrics, render
from backup_pipelines_tests.conftest import REPO_ROOT

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
REQUIRED_ALERTS = {"BackupFailed", "BackupTooOld", "RestoreDrillFailed", "OffsiteCopyMissing"}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is missing: apt-get install -y prometheus (scripts/bootstrap.sh does)"
        )
    return promtool


@pytest.mark.slow
def test_promtool_rule_unit_tests_pass() -> None:
    check = subprocess.run(
        [_promtool(), "check", "rules", "alerts.yml"], cwd=RULES_DIR, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(
        [_promtool(), "test", "rules", "alerts_test.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_cover_the_required_alerts_and_use_exported_metric_names() -> None:
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) >= REQUIRED_ALERTS
    assert "86400" in alerts["BackupTooOld"]["expr"]
    full = TargetMetrics(
        target="t",
        backup_success=True,
        backup_last_success_timestamp=1.0,
        backup_size_bytes=1,
        backup_duration_seconds=1.0,
        restore_drill_success=True,
        restore_drill_duration_seconds=1.0,
        restore_drill_last_success_timestamp=1.0,
        offsite_copy_success=True,
        offsite_copy_last_success_timestamp=1.0,
    )
    exported = set(re.findall(r"^(backup_pipelines_\w+)", render([full]).decode(), re.MULTILINE))
    for name, rule in alerts.items():
        used = set(re.findall(r"backup_pipelines_\w+", rule["expr"]))
        assert used, name
        assert used <= exported, f"{name} uses metrics nobody exports: {used - exported}"
