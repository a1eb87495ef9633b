"""Server targets in Dagster: one partition per database, kept in step by
``server_databases_sensor``; scheduled runs per database; a failing database fails alone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import pytest

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.lib.tags import TAG_TARGET
from backup_pipelines_tests.alert_receivers import WebhookReceiver, webhook_receiver
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.server_support import (
    backup_role_dsn,
    create_database,
    fingerprint,
    server_cluster,
)

pytestmark = pytest.mark.postgres

PARTITIONS = "fleet_databases"
JOB = "logical_backups_fleet"
SCHEDULE = "daily_backup_fleet_schedule"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalCluster]:
    with server_cluster(DB_PASSWORD) as cluster:
        for name in ("app_a", "app_b", "tmp_scratch"):
            create_database(cluster, name)
        yield cluster


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as receiver:
        yield receiver


@pytest.fixture
def project(server: LocalCluster, make_project, hooks: WebhookReceiver):
    return make_project(
        {
            "fleet": {
                "dsn_env": "DATABASE_URL_FLEET",
                "databases": "all",
                "exclude": ["postgres", "tmp_*"],
            }
        },
        env={"DATABASE_URL_FLEET": backup_role_dsn(server)},
        notifiers=[{"type": "webhook", "url": f"{hooks.url}/alerts"}],
    )


def load_defs() -> dg.Definitions:
    from backup_pipelines.definitions import defs

    return defs()


def tick_sensor(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> str:
    """One sensor tick, its partition requests applied as the daemon would; the new cursor."""
    sensor = defs.resolve_sensor_def("server_databases_sensor")
    result = sensor(
        dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            repository_def=defs.get_repository_def(),
            resources={"backup_engine": BackupEngineResource()},
        )
    )
    assert isinstance(result, dg.SensorResult)
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result.cursor or ""


def scheduled_runs(
    defs: dg.Definitions, instance: dg.DagsterInstance
) -> dict[str, dg.ExecuteInProcessResult]:
    """Evaluate the daily backup schedule of the server target and run what it requests."""
    schedule = defs.resolve_schedule_def(SCHEDULE)
    moment = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
    tick = schedule.evaluate_tick(
        dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=moment,
            repository_def=defs.get_repository_def(),
        )
    )
    job = defs.resolve_job_def(JOB)
    results = {}
    for request in tick.run_requests or []:
        assert request.tags[TAG_TARGET] == "fleet"
        assert request.partition_key is not None
        results[request.partition_key] = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            tags=request.tags,
            raise_on_error=False,
        )
    return results


def test_partitions_follow_the_server_and_each_database_is_backed_up_alone(
    server: LocalCluster, project, hooks: WebhookReceiver
) -> None:
    defs = load_defs()
    root = project.resolved_backup_root / "fleet"
    with dg.instance_for_test() as instance:
        cursor = tick_sensor(defs, instance, None)
        assert sorted(instance.get_dynamic_partitions(PARTITIONS)) == ["app_a", "app_b"]

        results = scheduled_runs(defs, instance)
        assert sorted(results) == ["app_a", "app_b"]
        for database, result in results.items():
            assert result.success, database
            [event] = result.get_asset_materialization_events()
            assert event.partition == database
            checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
            assert checks["checksum_matches"].passed and checks["archive_readable"].passed
            [artifact] = list_artifacts(root / database)
            assert artifact.meta.database == database

        # A database created after the sensor last ran: picked up, backed up next run.
        create_database(server, "app_c", rows=123)
        cursor = tick_sensor(defs, instance, cursor)
        assert "app_c" in instance.get_dynamic_partitions(PARTITIONS)
        results = scheduled_runs(defs, instance)
        assert sorted(results) == ["app_a", "app_b", "app_c"]
        assert results["app_c"].success
        [artifact] = list_artifacts(root / "app_c")
        assert artifact.meta.total_rows == 123

        # A database the backup role may not read fails its own partition, never the others.
        create_database(server, "locked", owner="postgres")
        server.psql("REVOKE CONNECT ON DATABASE locked FROM PUBLIC")
        cursor = tick_sensor(defs, instance, cursor)
        results = scheduled_runs(defs, instance)
        assert not results["locked"].success
        [failure] = [
            e
            for e in results["locked"].all_events
            if e.event_type == dg.DagsterEventType.STEP_FAILURE
        ]
        message = failure.step_failure_data.error.message
        assert "cannot connect to backup_role@127.0.0.1" in message and "/locked" in message
        assert "CONNECT privilege" in message and "GRANT CONNECT" in message
        assert all(results[d].success for d in ("app_a", "app_b", "app_c"))
        server.psql("DROP DATABASE locked")

        # A dropped database: partition gone, backups kept, announced exactly once.
        kept = list_artifacts(root / "app_b")
        assert len(kept) == 3  # one per scheduled run
        expected = fingerprint(server, "app_b")
        server.psql('DROP DATABASE "app_b"')
        for _ in range(3):
            cursor = tick_sensor(defs, instance, cursor)
        assert sorted(instance.get_dynamic_partitions(PARTITIONS)) == ["app_a", "app_c"]
        notices = [b for b in hooks.bodies("/alerts") if "app_b" in b["title"]]
        assert len(notices) == 1
        assert "no longer on the server" in notices[0]["message"]
        assert "restore latest fleet --database app_b" in notices[0]["message"]
        # "locked" was announced once as well when it went away.
        assert len([b for b in hooks.bodies("/alerts") if "locked" in b["title"]]) == 1
        assert [a.path for a in list_artifacts(root / "app_b")] == [a.path for a in kept]
        assert sorted(scheduled_runs(defs, instance)) == ["app_a", "app_c"]

        # Its backup still restores what it held (onto the same server, under its own name).
        from backup_pipelines.engine.config import load_config
        from backup_pipelines.engine.restore import restore_database

        server.psql('CREATE DATABASE "app_b" OWNER backup_role')
        restore_database(load_config(), "fleet", "latest", confirm="fleet", database="app_b")
        assert fingerprint(server, "app_b") == expected
        # The server as the module's other tests expect it (app_a and app_b), in any order.
        server.psql('DROP DATABASE "app_c"')


def test_manual_partition_run_is_tagged_with_its_target(project) -> None:
    """A run of one partition started from the UI (no schedule tags) still gets the target
    tag from the run coordinator, so the per-target limits hold it."""
    from backup_pipelines.lib.run_coordinator import target_tags

    defs = load_defs()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTITIONS, ["app_a"])
        job = defs.resolve_implicit_global_asset_job_def()
        run = instance.create_run_for_job(
            job,
            asset_selection=frozenset({dg.AssetKey(["fleet", "logical_backup"])}),
            tags={"dagster/partition": "app_a"},
        )
        assert target_tags(instance, run)[TAG_TARGET] == "fleet"


def test_a_server_target_is_as_fresh_as_its_stalest_database(project) -> None:
    """The stale-backup alert must not let one database that is never backed up hide behind
    the others."""
    from backup_pipelines.engine.backup.logical import run_backup
    from backup_pipelines.lib.status import newest_backup_timestamp

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTITIONS, ["app_a", "app_b"])
        run_backup(project.target("fleet", "app_a"))
        assert newest_backup_timestamp(instance, project, "fleet") is None
        second = run_backup(project.target("fleet", "app_b"))
        newest = newest_backup_timestamp(instance, project, "fleet")
        first = list_artifacts(project.target("fleet", "app_a").backup_dir)[0]
        assert newest == first.meta.finished_at.timestamp() < second.meta.finished_at.timestamp()


def test_weekly_drill_runs_per_database(project) -> None:
    """The restore drill schedule of a server target asks for one run per database; each run
    backs up and drills that database, and its checks say so for that partition."""
    defs = load_defs()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PARTITIONS, ["app_a"])
        schedule = defs.resolve_schedule_def("weekly_restore_drill_fleet_schedule")
        tick = schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=instance,
                scheduled_execution_time=datetime(2026, 11, 29, 3, 0, tzinfo=UTC),
                repository_def=defs.get_repository_def(),
            )
        )
        [request] = tick.run_requests or []
        assert request.partition_key == "app_a" and request.tags[TAG_TARGET] == "fleet"
        result = defs.resolve_job_def("restore_drills_fleet").execute_in_process(
            instance=instance, partition_key="app_a", tags=request.tags, raise_on_error=False
        )
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["restore_drill_passed"].passed
        drilled = {
            e.asset_key.path[-1]: e.step_materialization_data.materialization
            for e in result.get_asset_materialization_events()
        }
        assert drilled["restore_drill"].partition == "app_a"
        backup = str(drilled["restore_drill"].metadata["backup"].value)
        assert "/fleet/app_a/app_a_" in backup
        assert drilled["restore_drill"].metadata["rows"].value == 50

        # The follow-up (offsite copy and retention) of that backup is for the same database.
        follow = defs.resolve_sensor_def("fleet_offsite_and_retention")
        # (The daemon validates the partition key against the instance; so does this.)
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            evaluation = follow.evaluate_tick(
                dg.build_sensor_context(
                    instance=instance,
                    repository_def=defs.get_repository_def(),
                    resources={"backup_engine": BackupEngineResource()},
                )
            )
        [follow_up] = evaluation.run_requests or []
        assert follow_up.partition_key == "app_a"
        assert follow_up.tags[TAG_TARGET] == "fleet"
        assert follow.job_name == "offsite_and_retention_fleet"
        retained = defs.resolve_job_def("offsite_and_retention_fleet").execute_in_process(
            instance=instance, partition_key="app_a", tags=follow_up.tags, raise_on_error=False
        )
        assert retained.success
        [inventory] = retained.get_asset_materialization_events()
        assert inventory.partition == "app_a"
        assert (
            inventory.step_materialization_data.materialization.metadata["local_count"].value == 1
        )
