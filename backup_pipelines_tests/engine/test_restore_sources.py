"""Restores of encrypted backups and of offsite copies read from a real S3 server (moto over HTTP)."""

from __future__ import annotations

import logging
import secrets

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.offsite import upload_backup
from backup_pipelines.engine.restore import RestoreRefusedError, RestoreStepError, restore_database
from backup_pipelines.engine.restore.locate import configured_offsite_storage
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import backup_files, databases

log = logging.getLogger("test")

PASSPHRASE = "restore drill passphrase " + secrets.token_hex(4)
CHANGE_SQL = "DELETE FROM scheduling.shift WHERE id % 2 = 0; UPDATE hr.employee SET notes = NULL"


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"bp-restore-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=name)
    return name


def _settings(dump_format: str, compression: str, encrypted: bool, bucket: str | None) -> dict:
    settings: dict = {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}
    if encrypted:
        settings["encryption"] = {"mode": "passphrase", "passphrase_env": "BP_RESTORE_PASS"}
    if bucket:
        settings["offsite"] = {"bucket": bucket, "prefix": "nightly"}
    return settings


@pytest.mark.parametrize(
    ("dump_format", "compression", "encrypted", "spec"),
    [
        ("plain", "gzip", True, "path"),
        ("plain", "zstd", False, "s3"),
        ("custom", "gzip", True, "s3"),
        ("custom", "zstd", True, "latest-s3"),
        ("directory", "gzip", False, "s3"),
        ("directory", "zstd", True, "latest-s3"),
    ],
)
def test_restore_encrypted_and_offsite_round_trips(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    bucket: str,
    dump_format: str,
    compression: str,
    encrypted: bool,
    spec: str,
) -> None:
    config = make_project(
        {"prod": _settings(dump_format, compression, encrypted, bucket)},
        env={"DB_PROD": pg.dsn(sample_db), "BP_RESTORE_PASS": PASSPHRASE},
    )
    target = config.target("prod")
    backup = run_backup(target, log=log)
    assert backup.meta.encryption["mode"] == ("passphrase" if encrypted else "none")
    at_backup = fingerprint(pg, sample_db)
    pg.psql(CHANGE_SQL, sample_db)
    location = str(backup.path)
    if spec != "path":
        storage = configured_offsite_storage(target)
        assert storage is not None
        location = upload_backup(backup, storage).url
        assert location.startswith(f"s3://{bucket}/nightly/prod/")
        # The local copy is gone (lost disk): only the offsite copy can bring the data back.
        for path in (backup.path, backup.sha256_path, backup.meta_path):
            path.unlink()
    if spec == "latest-s3":
        location = "latest"

    report = restore_database(config, "prod", location, confirm="prod", log=log)

    assert fingerprint(pg, sample_db) == at_backup
    if spec != "path":
        assert report.backup.startswith("s3://")
    pg.psql(f'DROP DATABASE "{report.previous_database}"')


def test_wrong_passphrase_is_refused_and_touches_nothing(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    settings = {"prod": _settings("custom", "zstd", True, None)}
    env = {"DB_PROD": pg.dsn(sample_db), "BP_RESTORE_PASS": PASSPHRASE}
    config = make_project(settings, env=env)
    backup = run_backup(config.target("prod"), log=log)
    pg.psql(CHANGE_SQL, sample_db)
    config = make_project(settings, env={**env, "BP_RESTORE_PASS": "not the passphrase"})
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)
    files_before = backup_files(config.target("prod").backup_dir)

    with pytest.raises(RestoreStepError) as caught:
        restore_database(config, "prod", "latest", confirm="prod", log=log)

    assert caught.value.step == "verify"
    assert backup.meta.encryption["key_id"] in str(caught.value)
    assert "not the passphrase" not in str(caught.value) and PASSPHRASE not in str(caught.value)
    assert fingerprint(pg, sample_db) == before_fp and databases(pg) == before_dbs
    assert backup_files(config.target("prod").backup_dir) == files_before


def test_s3_location_outside_the_configured_bucket_folder_is_refused(
    pg: LocalCluster, sample_db: str, make_project, bucket: str
) -> None:
    config = make_project(
        {"prod": _settings("plain", "gzip", False, bucket)}, env={"DB_PROD": pg.dsn(sample_db)}
    )
    backup = run_backup(config.target("prod"), log=log)
    storage = configured_offsite_storage(config.target("prod"))
    assert storage is not None
    other_bucket = f"{bucket}-other"
    default_s3_client().create_bucket(Bucket=other_bucket)
    from backup_pipelines.engine.storage import S3Storage

    elsewhere = upload_backup(backup, S3Storage(other_bucket, "nightly/prod")).url
    sideways = upload_backup(backup, S3Storage(bucket, "somewhere-else")).url
    before_fp = fingerprint(pg, sample_db)

    for location in (elsewhere, sideways):
        with pytest.raises(RestoreRefusedError, match="outside the configured bucket folder"):
            restore_database(config, "prod", location, confirm="prod", log=log)
    assert fingerprint(pg, sample_db) == before_fp
