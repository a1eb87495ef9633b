"""Monitoring sensors against real backups of a real PostgreSQL: alerts arrive as real emails
(aiosmtpd over STARTTLS with AUTH) and real webhook POSTs (a local HTTP server)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines_tests.alert_receivers import (
    SmtpServer,
    WebhookReceiver,
    smtp_server,
    webhook_receiver,
)

UI = "http://dagster.example.test:3000"
APP = dg.AssetKey(["app", "logical_backup"])
BROKEN = dg.AssetKey(["broken", "logical_backup"])


@dataclass
class Setup:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    smtp: SmtpServer
    hooks: WebhookReceiver
    textfile: Path

    def backup(self, key: dg.AssetKey) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def("logical_backups")
        return job.execute_in_process(
            instance=self.instance, asset_selection=[key], raise_on_error=False
        )

    def tick(self, name: str, cursor: str | None) -> dg.SensorResult | None:
        sensor = self.defs.resolve_sensor_def(name)
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor,
            repository_def=self.defs.get_repository_def(),
            resources={"backup_engine": BackupEngineResource()},
        )
        return sensor.evaluate_tick(context)

    def run_failure_tick(self, result: dg.ExecuteInProcessResult) -> None:
        run = self.instance.get_run_by_id(result.run_id)
        failure = next(
            e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE
        )
        sensor = self.defs.resolve_sensor_def("run_failure_alert_sensor")
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_event=failure,
            dagster_instance=self.instance,
            dagster_run=run,
            resources={"backup_engine": BackupEngineResource()},
        ).for_run_failure()
        sensor(context)


@pytest.fixture
def setup(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, monkeypatch
) -> Iterator[Setup]:
    with smtp_server(tmp_path) as smtp, webhook_receiver() as hooks:
        textfile = tmp_path / "textfile" / "backup_pipelines.prom"
        make_project(
            {
                "app": {
                    "dsn_env": "DB_APP",
                    "max_age": "4s",
                    "restore": {"rto_target_seconds": 600.0},
                },
                "broken": {"dsn_env": "DB_BROKEN", "max_age": "1h"},
            },
            env={
                "DB_APP": pg.dsn(sample_db),
                "DB_BROKEN": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
                "SMTP_USER": smtp.username,
                "SMTP_PASSWORD": smtp.password,
                "SLACK_HOOK_URL": f"{hooks.url}/slack",
            },
            alerts={"ui_base_url": UI},
            notifiers=[
                {
                    "type": "email",
                    "host": smtp.host,
                    "port": smtp.port,
                    "security": "starttls",
                    "username_env": "SMTP_USER",
                    "password_env": "SMTP_PASSWORD",
                    "ca_file": str(smtp.ca_file),
                    "sender": "backups@example.com",
                    "to": ["oncall@example.com"],
                },
                {"type": "slack", "webhook_url_env": "SLACK_HOOK_URL"},
                {"type": "webhook", "url": f"{hooks.url}/generic"},
            ],
            metrics={"textfile": str(textfile)},
        )
        with dg.instance_for_test() as instance:
            yield Setup(load_defs(), instance, smtp, hooks, textfile)


def test_stale_backup_alerts_once_then_resolves(setup: Setup) -> None:
    assert setup.backup(APP).success
    # Fresh (app) and within its first hour (broken, never backed up): nothing to say.
    first = setup.tick("stale_backup_sensor", None)
    assert setup.smtp.messages == [] and setup.hooks.requests == []

    time.sleep(4.5)
    second = setup.tick("stale_backup_sensor", first.cursor)
    messages = setup.smtp.wait_for(1)
    assert len(messages) == 1
    assert messages[0]["Subject"] == "[backup_pipelines] FAILED app: backup is stale"
    body = messages[0].get_content()
    assert "more than its max_age of 0:00:04" in body
    assert f"{UI}/assets/app/logical_backup" in body
    generic = setup.hooks.bodies("/generic")
    assert [(g["target"], g["status"], g["incident"]) for g in generic] == [
        ("app", "firing", "stale:app")
    ]
    assert len(setup.hooks.bodies("/slack")) == 1

    # Next tick, and a "restarted" daemon evaluating with the stored cursor: quiet.
    third = setup.tick("stale_backup_sensor", second.cursor)
    setup.tick("stale_backup_sensor", second.cursor)
    time.sleep(0.3)
    assert len(setup.smtp.messages) == 1 and len(setup.hooks.requests) == 2

    assert setup.backup(APP).success
    fourth = setup.tick("stale_backup_sensor", third.cursor)
    messages = setup.smtp.wait_for(2)
    assert len(messages) == 2
    assert messages[1]["Subject"] == "[backup_pipelines] RESOLVED app: fresh backup again"
    assert [g["status"] for g in setup.hooks.bodies("/generic")] == ["firing", "resolved"]
    setup.tick("stale_backup_sensor", fourth.cursor)
    time.sleep(0.3)
    assert len(setup.smtp.messages) == 2 and len(setup.hooks.requests) == 4


def test_failed_backup_run_alerts_with_reason_and_link(setup: Setup) -> None:
    result = setup.backup(BROKEN)
    assert not result.success
    setup.run_failure_tick(result)
    (message,) = setup.smtp.wait_for(1)
    assert message["Subject"] == "[backup_pipelines] FAILED broken: logical_backup failed"
    body = message.get_content()
    assert "Target:   broken" in body
    assert "cannot connect" in body
    assert f"{UI}/runs/{result.run_id}" in body
    (generic,) = setup.hooks.bodies("/generic")
    assert generic["what"] == "logical_backup" and generic["link"] == f"{UI}/runs/{result.run_id}"


def test_tampered_backup_fails_its_check_and_alerts_once(setup: Setup) -> None:
    assert setup.backup(APP).success
    start = setup.tick("failed_check_alert_sensor", None)
    path = Path(
        setup.instance.get_latest_materialization_event(APP)
        .asset_materialization.metadata["path"]
        .value
    )
    with path.open("r+b") as handle:
        handle.seek(200)
        handle.write(b"tampered")

    check_job = dg.define_asset_job(
        "verify_app", selection=dg.AssetSelection.checks(dg.AssetCheckKey(APP, "checksum_matches"))
    )
    job = dg.Definitions.merge(setup.defs, dg.Definitions(jobs=[check_job])).resolve_job_def(
        "verify_app"
    )
    result = job.execute_in_process(instance=setup.instance, raise_on_error=False)
    assert not result.success  # the check is blocking: the run fails too
    # Someone re-runs the check on the same backup: still the same incident.
    again = job.execute_in_process(instance=setup.instance, raise_on_error=False)
    assert not again.success

    # The failed run is reported by the check alert alone, not twice.
    setup.run_failure_tick(result)
    after = setup.tick("failed_check_alert_sensor", start.cursor)
    (message,) = setup.smtp.wait_for(1)
    assert (
        message["Subject"]
        == "[backup_pipelines] FAILED app: check checksum_matches failed on logical_backup"
    )
    body = message.get_content()
    assert "sha256" in body.lower() or "checksum" in body.lower()
    assert f"{UI}/runs/{result.run_id}" in body
    setup.tick("failed_check_alert_sensor", after.cursor)
    time.sleep(0.3)
    assert len(setup.smtp.messages) == 1
    assert len(setup.hooks.bodies("/generic")) == 1

    # A new backup passes; when that one is damaged too, it is a new incident: a new alert.
    assert setup.backup(APP).success
    passed = setup.tick("failed_check_alert_sensor", after.cursor)
    newest = setup.instance.get_latest_materialization_event(APP)
    with Path(newest.asset_materialization.metadata["path"].value).open("r+b") as handle:
        handle.seek(200)
        handle.write(b"tampered")
    assert not job.execute_in_process(instance=setup.instance, raise_on_error=False).success
    setup.tick("failed_check_alert_sensor", passed.cursor)
    assert len(setup.smtp.wait_for(2)) == 2

    # The metrics say so too: the newest backup is not good.
    setup.tick("backup_metrics_sensor", None)
    values = _metric_values(setup.textfile)
    assert values[("backup_pipelines_backup_success", "app")] == 0


def test_metrics_sensor_exports_what_the_instance_knows(setup: Setup) -> None:
    assert setup.backup(APP).success
    assert not setup.backup(BROKEN).success
    setup.tick("backup_metrics_sensor", None)
    values = _metric_values(setup.textfile)
    materialization = setup.instance.get_latest_materialization_event(APP)
    size = materialization.asset_materialization.metadata["size_bytes"].value
    assert values[("backup_pipelines_backup_success", "app")] == 1
    assert values[("backup_pipelines_backup_success", "broken")] == 0
    assert values[("backup_pipelines_backup_size_bytes", "app")] == size
    assert values[("backup_pipelines_backup_duration_seconds", "app")] > 0
    assert (
        abs(values[("backup_pipelines_backup_last_success_timestamp_seconds", "app")] - time.time())
        < 60
    )
    assert ("backup_pipelines_backup_last_success_timestamp_seconds", "broken") not in values
    assert ("backup_pipelines_restore_drill_success", "app") not in values

    # A real restore drill of that backup: its result and measured RTO are exported too.
    drill = setup.defs.resolve_job_def("restore_drills").execute_in_process(
        instance=setup.instance, asset_selection=[dg.AssetKey(["app", "restore_drill"])]
    )
    assert drill.success
    rto = drill.get_asset_materialization_events()[0].materialization.metadata["rto_seconds"].value
    setup.tick("backup_metrics_sensor", None)
    values = _metric_values(setup.textfile)
    assert values[("backup_pipelines_restore_drill_success", "app")] == 1
    assert values[("backup_pipelines_restore_drill_duration_seconds", "app")] == rto
    assert ("backup_pipelines_restore_drill_success", "broken") not in values


def test_stale_sensor_waits_for_a_backup_already_running(setup: Setup) -> None:
    assert setup.backup(APP).success
    time.sleep(4.5)
    # The scheduled run has been created but not finished (max_age was reached meanwhile): wait.
    job = setup.defs.resolve_job_def("logical_backups")
    queued = setup.instance.create_run_for_job(
        job_def=job, asset_selection=frozenset({APP}), status=dg.DagsterRunStatus.NOT_STARTED
    )
    first = setup.tick("stale_backup_sensor", None)
    assert "app: stale, backup in progress" in first.skip_message
    time.sleep(0.3)
    assert setup.smtp.messages == []
    # It fails: now the staleness is real.
    setup.instance.report_run_failed(queued)
    setup.tick("stale_backup_sensor", first.cursor)
    (message,) = setup.smtp.wait_for(1)
    assert message["Subject"] == "[backup_pipelines] FAILED app: backup is stale"


def test_offsite_copy_metrics_follow_the_real_s3_copy(
    setup: Setup, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    bucket = f"metrics-{os.getpid()}-{int(time.time())}"
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket=bucket)
    monkeypatch.setenv("S3_BACKUP_BUCKET", bucket)
    setup.defs = load_defs()  # offsite_copy exists for targets with a bucket
    assert setup.backup(APP).success
    offsite = dg.AssetKey(["app", "offsite_copy"])
    copy = setup.defs.resolve_job_def("offsite_and_retention").execute_in_process(
        instance=setup.instance, asset_selection=[offsite]
    )
    assert copy.success
    setup.tick("backup_metrics_sensor", None)
    values = _metric_values(setup.textfile)
    assert values[("backup_pipelines_offsite_copy_success", "app")] == 1
    assert (
        abs(
            values[("backup_pipelines_offsite_copy_last_success_timestamp_seconds", "app")]
            - time.time()
        )
        < 60
    )

    # The copy disappears from S3: the ERROR check fails, and the metric says so.
    s3 = boto3.client("s3", endpoint_url=aws_env)
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    verify = dg.define_asset_job(
        "verify_offsite",
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(offsite, "offsite_copy_matches")),
    )
    job = dg.Definitions.merge(setup.defs, dg.Definitions(jobs=[verify])).resolve_job_def(
        "verify_offsite"
    )
    job.execute_in_process(instance=setup.instance, raise_on_error=False)
    setup.tick("backup_metrics_sensor", None)
    values = _metric_values(setup.textfile)
    assert values[("backup_pipelines_offsite_copy_success", "app")] == 0
    assert ("backup_pipelines_offsite_copy_last_success_timestamp_seconds", "app") not in values


def _metric_values(path: Path) -> dict[tuple[str, str | None], float]:
    return {
        (s.name, s.labels.get("target")): s.value
        for f in text_string_to_metric_families(path.read_text())
        for s in f.samples
    }


def test_periodic_failed_evaluations_alert_once_per_incident(setup: Setup) -> None:
    # Checks that sensors evaluate on a timer (the WAL archive's) fail on every tick while the
    # problem lasts: one alert when it starts, another only after it passed in between.
    key = dg.AssetCheckKey(APP, "archive_readable")

    def evaluate(passed: bool) -> None:
        setup.instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=APP,
                check_name=key.name,
                passed=passed,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"reason": "archive gap" if not passed else "ok"},
            )
        )

    cursor = setup.tick("failed_check_alert_sensor", None).cursor
    for passed in (False, False, False):
        evaluate(passed)
        cursor = setup.tick("failed_check_alert_sensor", cursor).cursor
    time.sleep(0.3)
    assert len(setup.smtp.messages) == 1
    assert "archive gap" in setup.smtp.messages[0].get_content()
    evaluate(True)
    evaluate(False)
    setup.tick("failed_check_alert_sensor", cursor)
    assert len(setup.smtp.wait_for(2)) == 2


def test_failure_alerts_name_the_assets_of_a_step_shared_by_targets(setup: Setup) -> None:
    """One op holds many targets' inventories: an alert on its step names the target and the
    asset from the run's plan, not the op's name."""
    from backup_pipelines.defs.monitoring.sensors import _assets_of_steps

    keys = [dg.AssetKey([name, "backup_inventory"]) for name in ("app", "broken")]
    job = setup.defs.resolve_implicit_global_asset_job_def()
    both = job.execute_in_process(instance=setup.instance, asset_selection=keys)
    one = job.execute_in_process(instance=setup.instance, asset_selection=keys[:1])
    run_both = setup.instance.get_run_by_id(both.run_id)
    run_one = setup.instance.get_run_by_id(one.run_id)
    assert run_both is not None and run_one is not None
    mapped = _assets_of_steps(setup.instance, run_both)
    assert {step: set(found) for step, found in mapped.items()} == {"backup_inventory": set(keys)}
    assert _assets_of_steps(setup.instance, run_one) == {"backup_inventory": keys[:1]}
