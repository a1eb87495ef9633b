"""Retention for PITR: base backups by the calendar policy (locally and offsite), WAL only older
than the oldest kept base backup, and the chain a kept base backup needs stays restorable."""

from __future__ import annotations

import time
from collections.abc import Iterator

import boto3
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.base import list_base_backups, run_base_backup
from backup_pipelines.engine.offsite import (
    base_backup_offsite_storage,
    offsite_storage,
    upload_backup,
)
from backup_pipelines.engine.pitr.health import archive_health
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.retention import apply_pitr_retention
from backup_pipelines.engine.pitr.window import parse_target_time
from backup_pipelines.engine.storage import list_stored_backups
from backup_pipelines.engine.wal import list_wal, segment_number, wal_archive_for
from backup_pipelines_tests.pitr_support import PASSWORD, PitrSetup, start_pitr_cluster


@pytest.fixture
def setup(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PitrSetup]:
    bucket = f"offsite-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    pitr = start_pitr_cluster(
        monkeypatch,
        target={
            "retention": {"daily": 1, "weekly": 0, "monthly": 0},
            "offsite": {"bucket": bucket, "prefix": "pg", "sse": "none"},
        },
    )
    yield pitr
    pitr.close()


@pytest.mark.postgres
def test_retention_prunes_old_base_backups_and_only_wal_before_the_oldest_kept(
    setup: PitrSetup,
) -> None:
    target = setup.target
    storage = base_backup_offsite_storage(target)
    setup.sql("CREATE TABLE t (id int)")
    for round_number in range(3):
        setup.sql(f"INSERT INTO t VALUES ({round_number})")
        artifact = run_base_backup(target)
        artifact.record_check("manifest", True, "checked in this test")
        upload_backup(artifact, storage)
        setup.sql("SELECT txid_current()")
        setup.switch_and_wait()
    backups = list_base_backups(target)
    assert len(backups) == 3
    newest_meta = backups[0][1]
    archive = wal_archive_for(target)
    before = {e.name for e in list_wal(archive) if e.kind == "segment"}

    report = apply_pitr_retention(setup.config, target, remote_storage=storage)

    # daily: 1 keeps today's newest; the two older ones go, locally and offsite.
    assert report.kept == [backups[0][0].path.name]
    assert sorted(report.pruned) == sorted(a.path.name for a, _ in backups[1:])
    assert [a.path.name for a, _ in list_base_backups(target)] == report.kept
    assert [a.path.name for a in list_stored_backups(storage)] == report.kept
    # Base backups live beside, not inside, the logical backups' offsite folder.
    assert list_stored_backups(offsite_storage(target)) == []

    first_needed = segment_number(newest_meta.first_wal_segment, newest_meta.wal_segment_size)
    after = {e.name for e in list_wal(archive) if e.kind == "segment"}
    assert report.keep_wal_from == newest_meta.first_wal_segment
    assert report.wal_removed and all(
        segment_number(name[:24]) < first_needed for name in report.wal_removed
    )
    assert after == {n for n in before if segment_number(n) >= first_needed}
    assert newest_meta.first_wal_segment in after
    health = archive_health(target)
    assert health.gaps == [] and health.healthy, health.problems

    # The kept base backup still recovers to a moment after it.
    setup.sql("INSERT INTO t VALUES (100)")
    time.sleep(0.2)
    moment = parse_target_time(setup.sql("SELECT clock_timestamp()"))
    time.sleep(0.2)
    setup.sql("INSERT INTO t VALUES (200)")
    setup.switch_and_wait()
    port = free_port()
    data_dir = setup.workdir / "after-retention" / "data"
    result = pitr_restore(setup.config, target, moment, data_dir, port=port, start=True)
    copy = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
    try:
        assert result.promoted
        assert copy.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t") == "0,1,2,100"
    finally:
        copy.pg_ctl("-m", "immediate", "stop")


@pytest.mark.postgres
def test_no_kept_base_backup_means_no_wal_is_pruned(setup: PitrSetup) -> None:
    for _ in range(2):
        setup.sql("SELECT txid_current()")
        setup.switch_and_wait()
    archive = wal_archive_for(setup.target)
    before = list_wal(archive)
    report = apply_pitr_retention(setup.config, setup.target)
    assert report.kept == [] and report.wal_removed == []
    assert list_wal(archive) == before
