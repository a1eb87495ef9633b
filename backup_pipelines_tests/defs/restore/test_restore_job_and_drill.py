"""The restore job, the drill asset with its checks, and the weekly schedule, through the real
Dagster definitions against a real PostgreSQL (and moto's S3 server for offsite copies)."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.offsite import upload_backup
from backup_pipelines.engine.restore.locate import configured_offsite_storage
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import (
    databases,
    forge_plain_backup,
    inject_before_first,
)

log = logging.getLogger("test")
CHANGE_SQL = "DELETE FROM scheduling.shift WHERE id % 4 = 0; UPDATE hr.employee SET notes = 'x'"
PASSPHRASE = "dagster restore passphrase " + secrets.token_hex(4)


def load_defs() -> dg.Definitions:
    from backup_pipelines.definitions import defs

    return defs()


def run_restore_job(instance: dg.DagsterInstance, **config: object) -> dg.ExecuteInProcessResult:
    job = load_defs().resolve_job_def("restore_database")
    return job.execute_in_process(
        run_config={"ops": {"restore_from_backup": {"config": config}}},
        instance=instance,
        raise_on_error=False,
    )


def materialize_drill(
    instance: dg.DagsterInstance, target: str = "prod"
) -> dg.ExecuteInProcessResult:
    job = load_defs().resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey([target, "restore_drill"])],
        raise_on_error=False,
    )


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.message  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("dump_format", "compression", "offsite"),
    [("custom", "gzip", False), ("custom", "zstd", True)],  # plain formats: see the CLI tests,
)
def test_restore_job_round_trip(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    aws_env: str,
    dump_format: str,
    compression: str,
    offsite: bool,
) -> None:
    settings: dict = {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}
    if offsite:
        bucket = f"bp-job-{secrets.token_hex(4)}"
        default_s3_client().create_bucket(Bucket=bucket)
        settings["offsite"] = {"bucket": bucket}
        settings["encryption"] = {"mode": "passphrase", "passphrase_env": "BP_JOB_PASS"}
    config = make_project(
        {"prod": settings}, env={"DB_PROD": pg.dsn(sample_db), "BP_JOB_PASS": PASSPHRASE}
    )
    backup = run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    location = str(backup.path)
    if offsite:
        storage = configured_offsite_storage(config.target("prod"))
        assert storage is not None
        location = upload_backup(backup, storage).url
    pg.psql(CHANGE_SQL, sample_db)

    with dg.instance_for_test() as instance:
        result = run_restore_job(instance, backup=location, target="prod", confirm="prod")
        assert result.success
        event_log = repr(instance.all_logs(result.run_id))
        assert "Restoring" in event_log and DB_PASSWORD not in event_log
        assert "pg_restore progress: " in event_log  # progress reaches the run's logs
        assert PASSPHRASE not in event_log
        [event] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        metadata = event.step_output_data.metadata  # type: ignore[union-attr]

    assert fingerprint(pg, sample_db) == at_backup
    assert metadata["backup"].value == location
    assert metadata["safety_backup"].value.startswith(str(config.target("prod").backup_dir))
    assert metadata["rows"].value == backup.meta.total_rows
    pg.psql(f'DROP DATABASE "{metadata["previous_database"].value}"')


@pytest.mark.parametrize(
    ("confirm", "expected"), [(None, "without confirmation"), ("staging", "does not match")]
)
def test_restore_job_without_matching_confirmation_fails_and_touches_nothing(
    pg: LocalCluster, sample_db: str, make_project, confirm: str | None, expected: str
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup = run_backup(config.target("prod"), log=log)
    pg.psql(CHANGE_SQL, sample_db)
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with dg.instance_for_test() as instance:
        result = run_restore_job(instance, backup=str(backup.path), target="prod", confirm=confirm)

    assert not result.success
    assert expected in failure_description(result)
    assert "nothing was touched" in failure_description(result)
    assert fingerprint(pg, sample_db) == before_fp and databases(pg) == before_dbs


def test_restore_job_failing_midway_names_step_and_safety_backup(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup = run_backup(config.target("prod"), log=log)
    broken = forge_plain_backup(backup, inject_before_first(b"CREATE TABLE", b"SELECT 1/0;\n"))
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with dg.instance_for_test() as instance:
        result = run_restore_job(instance, backup=str(broken), target="prod", confirm="prod")
        assert DB_PASSWORD not in repr(instance.all_logs(result.run_id))

    assert not result.success
    message = failure_description(result)
    assert "failed at step 'restore'" in message and "division by zero" in message
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    safety = failure.step_failure_data.user_failure_data.metadata["safety_backup"].value  # type: ignore[union-attr]
    assert safety in message and safety.startswith(str(config.target("prod").backup_dir))
    assert fingerprint(pg, sample_db) == before_fp and databases(pg) == before_dbs


def test_drill_passes_records_numeric_history_and_drops_scratch_database(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "format": "custom",
                "restore": {"rto_target_seconds": 600},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    backup = run_backup(config.target("prod"), log=log)
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with dg.instance_for_test() as instance:
        result = materialize_drill(instance)
        assert result.success
        [event] = result.get_asset_materialization_events()
        metadata = event.materialization.metadata
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}

    for numeric in ("rto_seconds", "rpo_seconds", "tables", "rows", "indexes_checked"):
        assert isinstance(metadata[numeric], dg.IntMetadataValue | dg.FloatMetadataValue), numeric
    assert 0 < metadata["rto_seconds"].value < 600
    assert metadata["rpo_seconds"].value >= 0
    assert metadata["tables"].value == len(backup.meta.row_counts)
    assert metadata["rows"].value == backup.meta.total_rows
    assert metadata["indexes_checked"].value >= 10  # primary keys, uniques, plain btree indexes
    assert metadata["source"].value == "local"
    assert checks["restore_drill_passed"].passed
    assert checks["rto_within_target"].passed
    assert checks["rto_within_target"].severity == dg.AssetCheckSeverity.WARN
    # Production untouched, scratch database gone.
    assert fingerprint(pg, sample_db) == before_fp and databases(pg) == before_dbs


def test_weekly_run_backs_up_then_drills_that_backup_with_default_settings(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    """The scheduled weekly run: a fresh backup and the drill of exactly that backup, with the
    default restore settings (no rto_target_seconds configured)."""
    make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    job = load_defs().resolve_job_def("restore_drills")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[
                dg.AssetKey(["prod", "logical_backup"]),
                dg.AssetKey(["prod", "restore_drill"]),
            ],
            raise_on_error=False,
        )
        assert result.success
        events = {
            e.materialization.asset_key.path[-1]: e.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(events) == {"logical_backup", "restore_drill"}
    assert events["restore_drill"]["backup"].value.endswith(
        str(events["logical_backup"]["path"].value).rsplit("/", 1)[-1]
    )
    assert events["restore_drill"]["rto_target_seconds"].value == 3600.0
    assert checks["restore_drill_passed"].passed and checks["checksum_matches"].passed


def test_drill_against_broken_backup_fails_its_check_and_says_why(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "restore": {"rto_target_seconds": 0.001}}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    backup = run_backup(config.target("prod"), log=log)
    forge_plain_backup(
        backup, inject_before_first(b"CREATE TABLE scheduling.shift", b"SELECT 1/0; -- broken\n")
    )
    before_dbs = databases(pg)

    with dg.instance_for_test() as instance:
        result = materialize_drill(instance)
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        [event] = result.get_asset_materialization_events()
        metadata = event.materialization.metadata

    assert not result.success  # blocking ERROR check: the run fails, so alerts fire
    drill = checks["restore_drill_passed"]
    assert not drill.passed and drill.severity == dg.AssetCheckSeverity.ERROR
    assert drill.metadata["failed_step"].value == "restore"
    assert "division by zero" in drill.metadata["reason"].value
    assert metadata["passed"].value is False and "division by zero" in metadata["result"].value
    assert "rto_seconds" not in metadata  # not measured: a gap in the plot, not a fake 0
    assert metadata["rpo_seconds"].value >= 0
    assert not checks["rto_within_target"].passed
    assert databases(pg) == before_dbs  # scratch database removed after the failure


def test_rto_over_target_warns(pg: LocalCluster, sample_db: str, make_project) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "restore": {"rto_target_seconds": 0.001}}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    run_backup(config.target("prod"), log=log)
    with dg.instance_for_test() as instance:
        result = materialize_drill(instance)
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert result.success  # a slow restore warns, it does not fail the run
    assert checks["restore_drill_passed"].passed
    rto = checks["rto_within_target"]
    assert not rto.passed and rto.severity == dg.AssetCheckSeverity.WARN
    assert "OVER the target" in rto.metadata["result"].value


@pytest.mark.slow
def test_weekly_drill_schedule_sunday_0300_running_one_run_per_target(make_project) -> None:
    make_project(
        {"prod": {"dsn_env": "DB_PROD"}, "staging": {"dsn_env": "DB_STAGING"}},
        timezone="Europe/Berlin",
    )
    defs = load_defs()
    schedule = next(s for s in defs.schedules if s.name == "weekly_restore_drill_schedule")
    assert schedule.cron_schedule == "0 3 * * 0"
    assert schedule.execution_timezone == "Europe/Berlin"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.instance_for_test() as instance:
        tick = datetime(2026, 11, 29, 3, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # a Sunday
        data = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        )
    requests = data.run_requests or []
    # The weekly run takes a fresh backup and drills it, like the guide's `--test` cron line.
    assert sorted(tuple(r.asset_selection) for r in requests) == [
        (dg.AssetKey(["prod", "logical_backup"]), dg.AssetKey(["prod", "restore_drill"])),
        (dg.AssetKey(["staging", "logical_backup"]), dg.AssetKey(["staging", "restore_drill"])),
    ]
    specs = {
        (key.to_user_string(), check.name)
        for key, check in (
            (c.asset_key, c)
            for a in defs.assets or []
            if isinstance(a, dg.AssetsDefinition)
            for c in a.check_specs
        )
    }
    assert ("prod/restore_drill", "restore_drill_passed") in specs
    assert ("prod/restore_drill", "rto_within_target") in specs


def test_definitions_load_with_restore_job_and_drills(make_project) -> None:
    make_project({"prod": {"dsn_env": "DB_PROD"}, "staging": {"dsn_env": "DB_STAGING"}})
    defs = load_defs()
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("restore_database")
    fields = job.run_config_schema.config_type.fields["ops"].config_type.fields
    config_fields = fields["restore_from_backup"].config_type.fields["config"].config_type.fields
    assert {"backup", "target", "confirm"} <= set(config_fields)
    assert config_fields["backup"].is_required and not config_fields["confirm"].is_required


def test_drills_of_targets_on_one_server_run_in_one_step_each_with_its_own_verdict(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    """Single-database targets on the same server share one drill op (in that server's pool):
    a run drilling several restores each one, and a broken backup fails only its own target's
    check, after the others were drilled."""
    config = make_project(
        {"good": {"dsn_env": "DB_PROD"}, "broken": {"dsn_env": "DB_PROD"}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    run_backup(config.target("good"), log=log)
    broken = run_backup(config.target("broken"), log=log)
    forge_plain_backup(
        broken, inject_before_first(b"CREATE TABLE scheduling.shift", b"SELECT 1/0; -- broken\n")
    )
    definitions = load_defs()
    keys = [dg.AssetKey([name, "restore_drill"]) for name in ("broken", "good")]
    assert len({definitions.get_assets_def(key).op.name for key in keys}) == 1
    with dg.instance_for_test() as instance:
        result = definitions.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=keys, raise_on_error=False
        )
    drilled = {
        e.asset_key.path[0]: e.materialization for e in result.get_asset_materialization_events()
    }
    verdicts = {
        e.asset_key.path[0]: e
        for e in result.get_asset_check_evaluations()
        if e.check_name == "restore_drill_passed"
    }
    assert set(drilled) == {"good", "broken"}
    assert verdicts["good"].passed and drilled["good"].metadata["passed"].value is True
    assert drilled["good"].metadata["rows"].value > 0
    assert not verdicts["broken"].passed
    assert "division by zero" in verdicts["broken"].metadata["reason"].value
    assert not result.success  # the blocking check of `broken` fails the step after both ran
