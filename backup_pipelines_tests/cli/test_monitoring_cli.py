"""The cron path without Dagster: `backup-pipelines cron-backup` logs to a rotated file, exits
non-zero on failure and emails the notifiers; freshness, metrics and notifier checks."""

from __future__ import annotations

import logging
import time
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from backup_pipelines.cli import configure_logging
from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines_tests.alert_receivers import smtp_server, webhook_receiver
from backup_pipelines_tests.conftest import DB_PASSWORD


def _values(path: Path) -> dict[tuple[str, str | None], float]:
    return {
        (s.name, s.labels.get("target")): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_cron_backup_logs_exports_metrics_and_alerts_on_failure(
    pg: LocalCluster, sample_db: str, make_project, run_cli, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "cron.log"
    textfile = tmp_path / "metrics" / "backup_pipelines.prom"
    with smtp_server(tmp_path) as smtp:
        make_project(
            {"app": {"dsn_env": "DB_APP"}, "down": {"dsn_env": "DB_DOWN"}},
            env={
                "DB_APP": pg.dsn(sample_db),
                # The right password, a port nobody listens on: it must not leak into logs or mail.
                "DB_DOWN": f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/x",
                "SMTP_USER": smtp.username,
                "SMTP_PASSWORD": smtp.password,
            },
            notifiers=[
                {
                    "type": "email",
                    "host": smtp.host,
                    "port": smtp.port,
                    "username_env": "SMTP_USER",
                    "password_env": "SMTP_PASSWORD",
                    "ca_file": str(smtp.ca_file),
                    "sender": "backups@example.com",
                    "to": ["oncall@example.com"],
                }
            ],
            metrics={"textfile": str(textfile)},
        )
        ok = run_cli("--log-file", str(log_file), "cron-backup", "app")
        assert ok.returncode == 0, ok.stderr
        assert _values(textfile)[("backup_pipelines_backup_success", "app")] == 1
        assert smtp.messages == []

        failed = run_cli("--log-file", str(log_file), "cron-backup", "down")
        assert failed.returncode == 1
        (message,) = smtp.wait_for(1)

    assert message["Subject"] == "[backup_pipelines] FAILED down: scheduled backup failed"
    body = message.get_content()
    assert "cannot connect" in body and str(log_file) in body
    log_text = log_file.read_text()
    assert "cron-backup app: succeeded" in log_text
    assert "cron-backup down: FAILED" in log_text and "cannot connect" in log_text
    for text in (log_text, body, failed.stdout, failed.stderr):
        assert DB_PASSWORD not in text
    # The target that never backed up is unknown, not "succeeded".
    assert ("backup_pipelines_backup_success", "down") not in _values(textfile)


def test_log_file_rotates_daily_keeping_30_days(tmp_path: Path) -> None:
    configure_logging(False, str(tmp_path / "cron.log"))
    try:
        (handler,) = [
            h for h in logging.getLogger().handlers if isinstance(h, TimedRotatingFileHandler)
        ]
        assert handler.when == "MIDNIGHT" and handler.backupCount == 30
    finally:
        configure_logging(False, None)


def test_unknown_target_is_a_usage_error(make_project, cli) -> None:
    make_project({"app": {"dsn_env": "DB_APP"}})
    result = cli("cron-backup", "nope")
    assert result.returncode == 2
    assert "unknown target 'nope'" in result.stderr


def test_check_freshness_exit_status_and_notify(
    pg: LocalCluster, sample_db: str, make_project, cli
) -> None:
    with webhook_receiver() as hooks:
        make_project(
            {"app": {"dsn_env": "DB_APP", "max_age": "4s"}},
            env={"DB_APP": pg.dsn(sample_db)},
            notifiers=[{"type": "webhook", "url": hooks.url}],
        )
        never = cli("check-freshness", "--notify")
        assert never.returncode == 1 and "app: STALE - no backup at all" in never.stdout
        assert cli("backup", "app", "--skip-verify").returncode == 0
        fresh = cli("check-freshness", "app")
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        assert "app: ok" in fresh.stdout
        time.sleep(4.5)
        stale = cli("check-freshness", "--notify")
        assert stale.returncode == 1 and "app: STALE - newest backup is" in stale.stdout
        bodies = hooks.bodies()
    assert [b["target"] for b in bodies] == ["app", "app"]
    assert bodies[1]["reason"].startswith("newest backup finished")


def test_metrics_and_test_notifiers_commands(make_project, run_cli, tmp_path: Path) -> None:
    with webhook_receiver() as hooks:
        make_project(
            {"app": {"dsn_env": "DB_APP"}},
            notifiers=[
                {"type": "webhook", "name": "ops", "url": f"{hooks.url}/ops"},
                {"type": "webhook", "name": "dead", "url": f"http://127.0.0.1:{free_port()}/"},
            ],
        )
        result = run_cli("test-notifiers")
        assert result.returncode == 1
        assert "ops: delivered" in result.stdout
        assert "webhook:dead: FAILED - cannot connect" in result.stdout
        assert hooks.bodies("/ops")[0]["severity"] == "info"

    none = run_cli("metrics")
    assert none.returncode == 2 and "nowhere to export metrics" in none.stderr
    textfile = tmp_path / "m.prom"
    written = run_cli("metrics", "--textfile", str(textfile))
    assert written.returncode == 0, written.stderr
    assert ("backup_pipelines_metrics_generated_timestamp_seconds", None) in _values(textfile)
