"""``<target>/offsite_copy`` and ``offsite_copy_matches`` through the real Dagster definitions,
with a real PostgreSQL, real gpg and moto's S3 server over HTTP."""

from __future__ import annotations

import secrets

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.storage import default_s3_client, open_backup
from backup_pipelines.engine.verify import verify_artifact

OFFSITE = dg.AssetKey(["production", "offsite_copy"])
BACKUP = dg.AssetKey(["production", "logical_backup"])
INVENTORY = dg.AssetKey(["production", "backup_inventory"])


def load_defs() -> dg.Definitions:
    from backup_pipelines.definitions import defs

    return defs()


def run_assets(instance: dg.DagsterInstance, *keys: dg.AssetKey) -> dg.ExecuteInProcessResult:
    job = load_defs().resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance, asset_selection=list(keys), raise_on_error=False
    )


def run_offsite_check(instance: dg.DagsterInstance) -> dg.AssetCheckEvaluation:
    job = dg.define_asset_job(
        "offsite_check_only",
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(OFFSITE, "offsite_copy_matches")),
    )
    defs = dg.Definitions.merge(load_defs(), dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def("offsite_check_only").execute_in_process(
        instance=instance, raise_on_error=False
    )
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"bp-dagster-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def project(pg: LocalCluster, sample_db: str, make_project, bucket: str):
    return make_project(
        {
            "production": {
                "dsn_env": "DATABASE_URL_PRODUCTION",
                "encryption": {"mode": "passphrase", "passphrase_env": "BACKUP_PASSPHRASE"},
                "offsite": {"bucket": bucket, "prefix": "nightly", "storage_class": "STANDARD_IA"},
            }
        },
        env={
            "DATABASE_URL_PRODUCTION": pg.dsn(sample_db),
            "BACKUP_PASSPHRASE": "offsite test passphrase",
        },
    )


def test_offsite_copy_uploads_checks_and_is_idempotent(project, bucket: str) -> None:
    with dg.instance_for_test() as instance:
        result = run_assets(instance, BACKUP, OFFSITE, INVENTORY)
        assert result.success
        events = {e.asset_key: e for e in result.get_asset_materialization_events()}
        metadata = events[OFFSITE].materialization.metadata
        url = metadata["url"].value
        assert url.startswith(f"s3://{bucket}/nightly/production/") and url.endswith(".sql.gz.gpg")
        assert metadata["uploaded"].value is True
        assert metadata["storage_class"].value == "STANDARD_IA"
        assert metadata["server_side_encryption"].value == "AES256"
        assert metadata["encryption"].value == "passphrase"
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["offsite_copy_matches"].passed, checks["offsite_copy_matches"].metadata

        # The encrypted copy verifies straight from S3 (streamed and decrypted).
        remote = open_backup(url)
        assert all(o.passed for o in verify_artifact(remote))

        again = run_assets(instance, OFFSITE)
        assert again.success
        [event] = again.get_asset_materialization_events()
        assert event.materialization.metadata["uploaded"].value is False

        inventory = events[INVENTORY].materialization.metadata
        [row] = inventory["backups"].value.records
        assert row.data["where"] == "local+s3" and row.data["action"] == "kept"
        assert row.data["retention_class"] == "monthly"

        # Someone deletes the object: the check turns red with ERROR severity.
        client = default_s3_client()
        client.delete_object(Bucket=bucket, Key=url.split(f"s3://{bucket}/", 1)[1])
        evaluation = run_offsite_check(instance)
        assert not evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert "missing" in evaluation.metadata["result"].value


def test_s3_unreachable_fails_clearly_and_the_next_run_catches_up(
    project, bucket: str, monkeypatch, aws_env: str
) -> None:
    with dg.instance_for_test() as instance:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
        result = run_assets(instance, BACKUP, OFFSITE)
        assert not result.success
        backup_events = [
            e for e in result.get_asset_materialization_events() if e.asset_key == BACKUP
        ]
        assert len(backup_events) == 1  # the local backup was made and kept
        local_path = backup_events[0].materialization.metadata["path"].value
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        description = failure.step_failure_data.user_failure_data.description
        assert "unreachable" in description
        assert "next run uploads what is missing" in description
        assert local_path.rsplit("/", 1)[1] in description

        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env)
        caught_up = run_assets(instance, OFFSITE)
        assert caught_up.success
        [event] = caught_up.get_asset_materialization_events()
        assert event.materialization.metadata["uploaded"].value is True
        assert event.materialization.metadata["path"].value == local_path
        assert run_offsite_check(instance).passed


def test_each_new_backup_is_followed_by_offsite_copy_and_retention(project) -> None:
    definitions = load_defs()
    sensor = definitions.resolve_sensor_def("offsite_and_retention_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, definitions=definitions)
        assert sensor.evaluate_tick(context).run_requests == []
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=BACKUP))
        context = dg.build_sensor_context(instance=instance, definitions=definitions)
        [request] = sensor.evaluate_tick(context).run_requests
        assert request.asset_selection == [OFFSITE, INVENTORY]
        assert sensor.job_name == "offsite_and_retention"
        assert request.run_key and request.run_key != "production:"
        # The same backup is not followed twice.
        context = dg.build_sensor_context(
            instance=instance, definitions=definitions, cursor=context.cursor
        )
        assert sensor.evaluate_tick(context).run_requests == []


def test_one_targets_failing_upload_does_not_stop_the_others(make_project, bucket: str) -> None:
    """The offsite copies of all single-database targets are one op: in a run that copies
    several, a target whose bucket is missing fails by name after the others were copied, and
    its local backup stays where it is."""
    from datetime import UTC, datetime

    from backup_pipelines_tests.engine.storage_helpers import fake_backup

    config = make_project(
        {
            "alpha": {"dsn_env": "DATABASE_URL_X", "offsite": {"bucket": bucket}},
            "beta": {"dsn_env": "DATABASE_URL_X", "offsite": {"bucket": f"{bucket}-missing"}},
            "gamma": {"dsn_env": "DATABASE_URL_X", "offsite": {"bucket": bucket}},
        },
        env={"DATABASE_URL_X": "postgresql://unused@127.0.0.1:1/x"},
    )
    names = ["alpha", "beta", "gamma"]
    backups = {
        name: fake_backup(
            config.target(name).backup_dir, name, started_at=datetime.now(UTC), target=name
        )
        for name in names
    }
    keys = [dg.AssetKey([name, "offsite_copy"]) for name in names]
    with dg.instance_for_test() as instance:
        for name in names:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=[name, "logical_backup"],
                    metadata={"path": dg.MetadataValue.path(str(backups[name].path))},
                )
            )
        result = run_assets(instance, *keys)
    assert not result.success
    copied = {e.asset_key for e in result.get_asset_materialization_events()}
    assert copied == {keys[0], keys[2]}
    [failure] = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert "offsite copy failed for 1 of 3 targets" in description
    assert "beta: offsite copy of 'beta' failed" in description
    listed = default_s3_client().list_objects_v2(Bucket=bucket)
    stored = {item["Key"] for item in listed.get("Contents", [])}
    for name in ("alpha", "gamma"):
        assert f"{name}/{backups[name].path.name}" in stored
    assert backups["beta"].path.exists()
