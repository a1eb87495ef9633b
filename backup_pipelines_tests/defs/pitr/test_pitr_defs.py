"""The PITR definitions through Dagster, on real clusters: base backup + manifest check, the drill
and its check, the restore job, and the WAL archive sensor catching a gap (check + alert)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_aws.s3 import S3Resource

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.wal import list_wal, wal_archive_for
from backup_pipelines_tests.pitr_support import PASSWORD, TARGET, PitrSetup, start_pitr_cluster


def raw_pitr_objects() -> tuple[list, list]:  # type: ignore[type-arg]
    """Assets and checks without bound resources, as dg.materialize wants them."""
    from backup_pipelines.defs.pitr import assets, checks

    return list(assets.pitr_assets().assets or []), list(checks.pitr_checks().asset_checks or [])


def resources() -> dict[str, object]:
    from backup_pipelines.defs.resources import BackupEngineResource

    return {"backup_engine": BackupEngineResource(), "offsite_s3": S3Resource()}


def pitr_definitions() -> dg.Definitions:
    from backup_pipelines.defs.pitr import assets, checks, jobs, schedules, sensors
    from backup_pipelines.defs.resources import BackupEngineResource

    return dg.Definitions.merge(
        assets.pitr_assets(),
        checks.pitr_checks(),
        sensors.pitr_sensors(),
        jobs.pitr_jobs(),
        schedules.pitr_schedules(),
        dg.Definitions(
            resources={"backup_engine": BackupEngineResource(), "offsite_s3": S3Resource()}
        ),
    )


def sensor_context(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    cursor: str | None = None,
    config_path: str | None = None,
) -> dg.SensorEvaluationContext:
    """A tick of wal_archive_sensor, which reads the targets file through its resource."""
    from backup_pipelines.defs.resources import BackupEngineResource

    return dg.build_sensor_context(
        instance=instance,
        definitions=defs,
        cursor=cursor,
        resources={"backup_engine": BackupEngineResource(config_path=config_path)},
    )


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch, webhook: tuple[str, list[dict]]) -> Iterator[PitrSetup]:
    pitr = start_pitr_cluster(
        monkeypatch,
        top={"notifiers": [{"type": "webhook", "url": webhook[0]}]},
        pitr={"archive_lag_limit_minutes": 30},
    )
    yield pitr
    pitr.close()


def test_only_pitr_targets_get_pitr_definitions(tmp_path: Path, make_project) -> None:  # type: ignore[no-untyped-def]
    make_project(
        {
            "prod": {"dsn_env": "A", "pitr": {"archive_dir": str(tmp_path / "wal")}},
            "dev": {"dsn_env": "B"},
        }
    )
    defs = pitr_definitions()
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {
        "prod/base_backup",
        "prod/base_backup_offsite",
        "prod/wal_archive",
        "prod/pitr_drill",
    }
    checks = {k.name for k in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"base_backup_verified", "wal_archive_healthy", "pitr_drill_passed"}
    schedules = {s.name: s for s in defs.schedules}
    assert set(schedules) == {"weekly_base_backup_schedule", "cron_0_5_x_x_0_pitr_drill_schedule"}
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in schedules.values())
    assert schedules["weekly_base_backup_schedule"].cron_schedule == "0 3 * * 0"
    sensor = defs.resolve_sensor_def("wal_archive_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_job_def("pitr_restore") is not None


@pytest.mark.postgres
def test_base_backup_drill_and_restore_job(setup: PitrSetup) -> None:
    defs = pitr_definitions()
    setup.sql("CREATE TABLE t (id int)")
    setup.sql("INSERT INTO t SELECT generate_series(1, 100)")
    raw_assets, raw_checks = raw_pitr_objects()
    graph_assets = [a for a in raw_assets if isinstance(a, dg.AssetsDefinition)]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*raw_assets, *raw_checks],
            instance=instance,
            resources=resources(),
            selection=dg.AssetSelection.assets(*[a.key for a in graph_assets]).without_checks()
            | dg.AssetSelection.checks_for_assets(*[a.key for a in graph_assets]),
            raise_on_error=False,
        )
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert evaluations["base_backup_verified"].passed, evaluations[
            "base_backup_verified"
        ].metadata
        drill_meta = evaluations["pitr_drill_passed"].metadata
        assert evaluations["pitr_drill_passed"].passed, drill_meta["result"].value
        assert result.success
        materialized = {
            e.asset_key.path[-1]: e.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        drill = materialized["pitr_drill"]
        assert drill["passed"].value is True
        assert 0 < drill["rto_seconds"].value < 120
        assert 0 <= drill["rpo_seconds"].value < 5
        assert materialized["base_backup_offsite"]["uploaded"].value is False
        assert Path(str(materialized["base_backup"]["path"].value)).exists()

        # The restore job, with the CLI's settings, after more writes and an archived switch.
        moment = setup.sql("SELECT clock_timestamp()")
        setup.sql("INSERT INTO t SELECT generate_series(101, 150)")
        setup.switch_and_wait()
        port = free_port()
        data_dir = setup.workdir / "job-restore" / "data"
        run = defs.resolve_job_def("pitr_restore").execute_in_process(
            run_config={
                "ops": {
                    "restore_to_time": {
                        "config": {
                            "target": TARGET,
                            "to": moment,
                            "data_dir": str(data_dir),
                            "port": port,
                            "start": True,
                        }
                    }
                }
            },
            instance=instance,
            raise_on_error=False,
        )
        restored = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
        try:
            assert run.success
            assert run.output_for_node("restore_to_time")["promoted"] is True
            assert restored.psql("SELECT count(*) FROM t") == "100"
        finally:
            restored.pg_ctl("-m", "immediate", "stop")

        # A restore into a non-empty folder fails the run with the engine's message.
        refused = defs.resolve_job_def("pitr_restore").execute_in_process(
            run_config={
                "ops": {
                    "restore_to_time": {
                        "config": {"target": TARGET, "to": moment, "data_dir": str(data_dir)}
                    }
                }
            },
            instance=instance,
            raise_on_error=False,
        )
        assert not refused.success
        failure = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "not empty" in str(failure.event_specific_data.error)


@pytest.mark.postgres
def test_sensor_and_check_catch_a_gap_and_alert_once(
    setup: PitrSetup, webhook: tuple[str, list[dict]]
) -> None:
    from backup_pipelines.engine.backup.base import run_base_backup

    defs = pitr_definitions()
    run_base_backup(setup.target)
    for _ in range(3):
        setup.sql("SELECT txid_current()")
        setup.switch_and_wait()
    sensor = defs.resolve_sensor_def("wal_archive_sensor")
    with dg.instance_for_test() as instance:
        healthy = sensor(sensor_context(instance, defs))
        checks = [e for e in healthy.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
        assert [c.passed for c in checks] == [True]
        assert webhook[1] == []

        archive = wal_archive_for(setup.target)
        missing = sorted(e.name for e in list_wal(archive) if e.kind == "segment")[-2]
        archive.primary.delete(missing)

        broken = sensor(sensor_context(instance, defs, healthy.cursor))
        evaluation = [e for e in broken.asset_events if isinstance(e, dg.AssetCheckEvaluation)][0]
        assert evaluation.passed is False
        assert evaluation.check_name == "wal_archive_healthy"
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert missing in str(evaluation.metadata["result"].value)
        observation = [e for e in broken.asset_events if isinstance(e, dg.AssetObservation)][0]
        assert observation.asset_key == dg.AssetKey([TARGET, "wal_archive"])
        assert len(webhook[1]) == 1
        alert = webhook[1][0]
        assert alert["status"] == "firing" and alert["target"] == TARGET
        assert "gap in the WAL archive" in alert["reason"]

        # Still broken: no second alert for the same incident.
        again = sensor(sensor_context(instance, defs, broken.cursor))
        assert len(webhook[1]) == 1
        assert json.loads(again.cursor or "{}") == {TARGET: "unhealthy"}

        # The same check, executed on demand, fails too.
        raw_assets, raw_checks = raw_pitr_objects()
        check_def = [c for c in raw_checks if "wal_archive_healthy" in str(c.check_keys)][0]
        spec = [a for a in raw_assets if isinstance(a, dg.AssetSpec)][0]
        executed = dg.materialize(
            [spec, check_def],
            instance=instance,
            resources=resources(),
            selection=dg.AssetSelection.checks(check_def),
            raise_on_error=False,
        )
        [result] = executed.get_asset_check_evaluations()
        assert result.passed is False
        assert missing in str(result.metadata["result"].value)


def test_wal_archive_sensor_reads_the_targets_file_through_its_resource(
    tmp_path: Path, make_project, webhook: tuple[str, list[dict]]
) -> None:  # type: ignore[no-untyped-def]
    """The file the backup_engine resource names is the one read at each tick (notifiers,
    archive settings), like every other sensor, not the one the definitions loaded from."""
    targets = {"prod": {"dsn_env": "UNSET_DSN", "pitr": {"archive_dir": str(tmp_path / "wal")}}}
    make_project(targets)  # the definitions' file: no notifiers
    other = tmp_path / "other_targets.yaml"
    other.write_text(
        yaml.safe_dump(
            {
                "backup_root": str(tmp_path / "backups"),
                "notifiers": [{"type": "webhook", "url": webhook[0]}],
                "targets": targets,
            }
        )
    )
    defs = pitr_definitions()
    sensor = defs.resolve_sensor_def("wal_archive_sensor")
    with dg.instance_for_test() as instance:
        result = sensor(sensor_context(instance, defs, config_path=str(other)))
    (evaluation,) = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert evaluation.passed is False
    # The alert went to the notifier that only the resource's file names.
    assert [alert["target"] for alert in webhook[1]] == ["prod"]
    assert "WAL archive unhealthy" in webhook[1][0]["title"]
