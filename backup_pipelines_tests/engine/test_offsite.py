"""Offsite copies against moto's S3 server over HTTP: upload, idempotence, checks, outages."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from backup_pipelines.devtools.local_postgres import free_port
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.offsite import (
    apply_lifecycle,
    check_offsite_copy,
    lifecycle_rules,
    offsite_storage,
    sync_offsite,
    upload_backup,
)
from backup_pipelines.engine.retention import prune_target
from backup_pipelines.engine.storage import (
    S3Storage,
    StorageUnreachableError,
    default_s3_client,
    list_stored_backups,
)
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.engine.storage_helpers import fake_backup

MiB = 1 << 20


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"bp-offsite-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=name)
    return name


def _target(make_project, bucket: str, **offsite):
    config = make_project(
        {
            "prod": {
                "dsn_env": "UNUSED_DSN",
                "offsite": {"bucket": bucket, "prefix": "pg", **offsite},
            }
        }
    )
    return config.target("prod")


def test_upload_is_idempotent_and_records_sse_and_storage_class(make_project, bucket: str) -> None:
    target = _target(make_project, bucket, storage_class="STANDARD_IA", sse="AES256")
    artifact = fake_backup(target.backup_dir, "shop", payload=os.urandom(200_000))
    storage = offsite_storage(target)
    assert storage.url() == f"s3://{bucket}/pg/prod"

    first = upload_backup(artifact, storage)
    assert first.uploaded
    assert first.url == f"s3://{bucket}/pg/prod/{artifact.path.name}"
    assert first.info.storage_class == "STANDARD_IA"
    assert first.info.server_side_encryption == "AES256"
    assert first.info.sha256 == artifact.meta.sha256
    names = {o.name for o in storage.list()}
    assert names == {
        artifact.path.name,
        artifact.path.name + ".sha256",
        artifact.path.name + ".meta",
    }

    second = upload_backup(artifact, storage)
    assert not second.uploaded
    assert second.info.modified == first.info.modified  # nothing was written again
    assert check_offsite_copy(artifact, storage).passed


def test_kms_encryption_is_requested_and_recorded(make_project, bucket: str) -> None:
    target = _target(make_project, bucket, sse="aws:kms", kms_key_id="alias/backups")
    artifact = fake_backup(target.backup_dir, "shop")
    outcome = upload_backup(artifact, offsite_storage(target))
    assert outcome.info.server_side_encryption == "aws:kms"
    assert outcome.info.kms_key_id and "backups" in outcome.info.kms_key_id


def test_large_file_part_size_grows_under_a_small_part_ceiling(make_project, bucket: str) -> None:
    target = _target(make_project, bucket)
    artifact = fake_backup(target.backup_dir, "shop", payload=os.urandom(13 * MiB))
    # A ceiling of 3 parts stands in for S3's 10,000: 13 MiB needs parts of 5 MiB, not 4.
    storage = offsite_storage(target, min_part_size=4 * MiB, max_parts=3)
    outcome = upload_backup(artifact, storage)
    assert outcome.put is not None
    assert outcome.put.parts == 3 and outcome.put.part_size == 5 * MiB
    assert outcome.info.size == artifact.meta.size_bytes
    # The check recomputes S3's composite checksum from the local file.
    result = check_offsite_copy(artifact, storage)
    assert result.passed, result.message
    assert result.details["expected_s3_checksum_sha256"].endswith("-3")


def test_check_catches_deleted_replaced_and_incomplete_copies(make_project, bucket: str) -> None:
    target = _target(make_project, bucket)
    artifact = fake_backup(target.backup_dir, "shop", payload=os.urandom(100_000))
    storage = offsite_storage(target)
    upload_backup(artifact, storage)
    client = storage.client
    key = storage.key(artifact.path.name)

    # Replaced with other bytes of the same size, even carrying our metadata: S3's checksum differs.
    data = bytearray(artifact.path.read_bytes())
    data[1000] ^= 0xFF
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=bytes(data),
        ChecksumAlgorithm="SHA256",
        Metadata={"sha256": artifact.meta.sha256},
    )
    result = check_offsite_copy(artifact, storage)
    assert not result.passed and "replaced" in result.message

    # Replaced by another tool (no recorded SHA-256).
    client.put_object(Bucket=bucket, Key=key, Body=artifact.path.read_bytes())
    result = check_offsite_copy(artifact, storage)
    assert not result.passed and "replaced" in result.message

    # A re-run repairs it (the copy no longer matches, so it is uploaded again).
    assert upload_backup(artifact, storage).uploaded
    assert check_offsite_copy(artifact, storage).passed

    client.delete_object(Bucket=bucket, Key=key + ".meta")
    result = check_offsite_copy(artifact, storage)
    assert not result.passed and ".meta is missing" in result.message

    client.delete_object(Bucket=bucket, Key=key)
    result = check_offsite_copy(artifact, storage)
    assert not result.passed and "missing" in result.message


def test_a_modified_local_file_is_not_uploaded(make_project, bucket: str) -> None:
    target = _target(make_project, bucket)
    artifact = fake_backup(target.backup_dir, "shop")
    with artifact.path.open("ab") as handle:
        handle.write(b"tampered")
    storage = offsite_storage(target)
    with pytest.raises(IntegrityError, match="no longer matches"):
        upload_backup(artifact, storage)
    assert storage.list() == []


def test_sync_uploads_missing_backups_but_not_failed_ones(make_project, bucket: str) -> None:
    target = _target(make_project, bucket)
    now = datetime.now(UTC)
    good_old = fake_backup(target.backup_dir, "shop", started_at=now - timedelta(days=2))
    failed = fake_backup(
        target.backup_dir, "shop", started_at=now - timedelta(days=1), verified=False
    )
    newest = fake_backup(target.backup_dir, "shop", started_at=now)
    storage = offsite_storage(target)
    report = sync_offsite(target, storage, first=newest)
    assert report.error is None
    assert [o.artifact.path.name for o in report.uploaded] == [newest.path.name, good_old.path.name]
    assert report.skipped_failed == [failed.path.name]
    again = sync_offsite(target, storage)
    assert again.uploaded == [] and len(again.outcomes) == 2


@pytest.fixture
def private_moto() -> Iterator[tuple[str, callable, callable]]:
    """A moto server of this test's own, which the test may stop and start again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start() -> None:
        proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)

    start()
    yield url, start, stop
    stop()


def test_s3_down_mid_upload_keeps_local_and_next_run_catches_up(
    make_project, aws_env: str, private_moto, monkeypatch
) -> None:
    url, start, stop = private_moto
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    config = make_project({"prod": {"dsn_env": "UNUSED_DSN", "offsite": {"bucket": "outage-test"}}})
    target = config.target("prod")
    older = fake_backup(target.backup_dir, "shop", started_at=datetime.now(UTC) - timedelta(days=1))
    newest = fake_backup(target.backup_dir, "shop", payload=os.urandom(11 * MiB))

    def client():
        return boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)
        )

    broken = client()
    broken.create_bucket(Bucket="outage-test")
    parts_sent = []

    def kill_after_first_part(**kwargs) -> None:
        parts_sent.append(1)
        stop()  # the network goes away between two parts

    broken.meta.events.register("after-call.s3.UploadPart", kill_after_first_part)
    storage = offsite_storage(target, client=broken, min_part_size=5 * MiB)
    report = sync_offsite(target, storage, first=newest)
    assert parts_sent == [1]
    assert isinstance(report.error, StorageUnreachableError)
    assert "unreachable" in report.error.message and "next run" in (report.error.hint or "")
    assert report.pending == [newest.path.name, older.path.name]
    # The local backups are untouched and still verify.
    assert {a.path for a in list_artifacts(target.backup_dir)} == {older.path, newest.path}
    assert all(o.passed for o in verify_artifact(newest))

    start()  # S3 is back (an empty server: nothing of the failed run survived)
    fresh = client()
    fresh.create_bucket(Bucket="outage-test")
    storage = offsite_storage(target, client=fresh, min_part_size=5 * MiB)
    caught_up = sync_offsite(target, storage)
    assert caught_up.error is None
    assert {o.artifact.path.name for o in caught_up.uploaded} == {newest.path.name, older.path.name}
    assert check_offsite_copy(newest, storage).passed
    assert fresh.list_multipart_uploads(Bucket="outage-test").get("Uploads", []) == []


def test_upload_memory_stays_flat(make_project, bucket: str, tmp_path: Path) -> None:
    """Peak memory depends on the part size and the parts in flight, not on the file size.
    Two parts in flight: both files have more parts than that, so both peaks are the plateau."""
    target = _target(make_project, bucket)
    storage = offsite_storage(target, min_part_size=5 * MiB, concurrency=2)
    peaks = {}
    for size in (12, 36):
        artifact = fake_backup(
            target.backup_dir / str(size), f"shop{size}", payload=os.urandom(size * MiB)
        )
        tracemalloc.start()
        try:
            outcome = upload_backup(artifact, storage)
            _, peaks[size] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert outcome.put is not None
        assert outcome.put.parts == -(-artifact.meta.size_bytes // (5 * MiB))
    print(
        f"peak traced memory: 12 MiB file {peaks[12] / MiB:.1f} MiB, 36 MiB file {peaks[36] / MiB:.1f} MiB"
    )
    assert peaks[36] < peaks[12] * 1.25 + MiB
    # The parts in flight plus the one being read, each at most twice inside the HTTP stack.
    assert peaks[36] < 2 * (storage.concurrency + 1) * 5 * MiB + MiB


def test_retention_prunes_offsite_copies_with_their_sidecars(make_project, bucket: str) -> None:
    config = make_project(
        {
            "prod": {
                "dsn_env": "UNUSED_DSN",
                "offsite": {"bucket": bucket},
                "retention": {"daily": 2, "weekly": 0, "monthly": 0},
            }
        }
    )
    target = config.target("prod")
    now = datetime.now(UTC)
    made = [
        fake_backup(target.backup_dir, "shop", started_at=now - timedelta(days=d)) for d in range(5)
    ]
    storage = offsite_storage(target)
    sync_offsite(target, storage)
    # This host lost its two oldest backups: retention still prunes their offsite copies.
    for artifact in made[3:]:
        for path in (artifact.path, *artifact.sidecars):
            path.unlink()
    dry = prune_target(target, storage=storage, dry_run=True)
    assert {e.name for e in dry.pruned} == {a.path.name for a in made[2:]}
    assert len(storage.list()) == 15
    report = prune_target(target, storage=storage)
    assert report.errors == []
    kept = {a.path.name for a in made[:2]}
    assert {a.path.name for a in list_stored_backups(storage)} == kept
    assert {o.name for o in storage.list()} == {
        n + s for n in kept for s in ("", ".sha256", ".meta")
    }
    assert {a.path.name for a in list_artifacts(target.backup_dir)} == kept
    entry = next(e for e in report.entries if e.name == made[2].path.name)
    assert entry.deleted_from == ["local", "s3"]


def test_lifecycle_rules_apply_and_keep_other_rules(make_project, bucket: str) -> None:
    target = _target(make_project, bucket)
    rules = lifecycle_rules(target)
    archive, expire = rules
    assert archive["Transitions"] == [
        {"Days": 30, "StorageClass": "GLACIER"},
        {"Days": 90, "StorageClass": "DEEP_ARCHIVE"},
    ]
    assert archive["Filter"]["And"]["Prefix"] == "pg/prod/"
    assert expire["Expiration"] == {"Days": 365}
    client = default_s3_client()
    other = {
        "ID": "someone-elses",
        "Status": "Enabled",
        "Filter": {"Prefix": "logs/"},
        "Expiration": {"Days": 10},
    }
    client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [other]}
    )
    apply_lifecycle(target, S3Storage(bucket))
    apply_lifecycle(target, S3Storage(bucket))  # idempotent
    stored = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(r["ID"] for r in stored) == sorted(["someone-elses", archive["ID"], expire["ID"]])


def test_retention_still_prunes_locally_when_s3_is_unreachable(make_project, aws_env: str) -> None:
    config = make_project(
        {
            "prod": {
                "dsn_env": "UNUSED_DSN",
                "offsite": {"bucket": "unreachable"},
                "retention": {"daily": 1, "weekly": 0, "monthly": 0},
            }
        }
    )
    target = config.target("prod")
    now = datetime.now(UTC)
    made = [
        fake_backup(target.backup_dir, "shop", started_at=now - timedelta(days=d)) for d in range(3)
    ]
    dead = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    storage = offsite_storage(target, client=dead)
    report = prune_target(target, storage=storage)
    assert len(report.errors) == 1 and "not pruned" in report.errors[0]
    assert {a.path for a in list_artifacts(target.backup_dir)} == {made[0].path}
