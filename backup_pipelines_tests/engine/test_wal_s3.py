"""WAL archiving to S3 (moto's server over real HTTP) and point-in-time recovery from it."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.window import parse_target_time
from backup_pipelines.engine.wal import object_stem
from backup_pipelines_tests.pitr_support import PASSWORD, start_pitr_cluster

SEGMENT = "000000010000000000000007"


def _bucket(endpoint: str) -> tuple[object, str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    name = f"wal-{os.getpid()}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=name)
    return client, name


def _keys(client, bucket: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_archive_contract(aws_env: str, tmp_path: Path, make_project, cli) -> None:  # type: ignore[no-untyped-def]
    client, bucket = _bucket(aws_env)
    make_project({"main": {"dsn_env": "UNUSED", "pitr": {"archive_s3": f"s3://{bucket}/wal/main"}}})
    data = b"\x01" * 8192 + os.urandom(32 << 10) + b"\0" * (1 << 20)
    source = tmp_path / SEGMENT
    source.write_bytes(data)
    assert cli("wal-push", str(source)).returncode == 0
    stem = f"wal/main/{object_stem(SEGMENT)}"
    assert _keys(client, bucket) == [f"{stem}.meta", f"{stem}.zst"]
    head = client.head_object(Bucket=bucket, Key=f"{stem}.zst")
    assert head["ServerSideEncryption"] == "AES256"
    again = cli("wal-push", str(source))
    assert again.returncode == 0 and "identical content" in again.stderr

    other = tmp_path / "other" / SEGMENT
    other.parent.mkdir()
    other.write_bytes(os.urandom(4096))
    refused = cli("wal-push", str(other))
    assert refused.returncode == 1 and "DIFFERENT" in refused.stderr

    out = tmp_path / "fetched"
    assert cli("wal-fetch", SEGMENT, str(out)).returncode == 0
    assert out.read_bytes() == data
    assert cli("wal-fetch", "000000010000000000000099", str(out)).returncode == 1

    # A damaged object in the bucket is refused, never handed to PostgreSQL.
    client.put_object(Bucket=bucket, Key=f"{stem}.zst", Body=b"not zstd at all")
    damaged = tmp_path / "damaged"
    result = cli("wal-fetch", SEGMENT, str(damaged))
    assert result.returncode == 2 and "REFUSED" in result.stderr
    assert not damaged.exists()


def test_s3_unreachable_fails_and_leaves_nothing(
    aws_env: str, tmp_path: Path, make_project, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # wal-push spools through the temp folder: this test's own, so no other test's spool
    # (another worker archiving the same segment name) can be mistaken for a leftover.
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    client, bucket = _bucket(aws_env)
    make_project({"main": {"dsn_env": "UNUSED", "pitr": {"archive_s3": f"s3://{bucket}/wal"}}})
    source = tmp_path / SEGMENT
    source.write_bytes(os.urandom(64 << 10))
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = cli("wal-push", str(source), env={"AWS_ENDPOINT_URL_S3": dead})
    assert result.returncode == 1, result.stderr
    assert "unreachable" in result.stderr.lower() or "S3" in result.stderr
    assert time.monotonic() - started < 60
    assert _keys(client, bucket) == []
    assert not list(spool.glob("bp-wal-*/" + SEGMENT + "*"))


@pytest.mark.postgres
def test_archive_to_s3_and_recover_from_it(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client, bucket = _bucket(aws_env)
    setup = start_pitr_cluster(
        monkeypatch, pitr={"archive_s3": f"s3://{bucket}/wal/main"}, local_archive=False
    )
    restored: LocalCluster | None = None
    try:
        setup.sql("CREATE TABLE events (id int)")
        run_base_backup(setup.target)
        setup.sql("INSERT INTO events SELECT generate_series(1, 250)")
        time.sleep(0.2)
        target_time = parse_target_time(setup.sql("SELECT clock_timestamp()"))
        time.sleep(0.2)
        setup.sql("INSERT INTO events SELECT generate_series(251, 400)")
        archived = setup.switch_and_wait()
        assert f"wal/main/{object_stem(archived)}.meta" in _keys(client, bucket)

        port = free_port()
        data_dir = setup.workdir / "restored" / "data"
        result = pitr_restore(
            setup.config, setup.target, target_time, data_dir, port=port, start=True
        )
        restored = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
        assert result.promoted
        assert restored.psql("SELECT count(*), max(id) FROM events") == "250|250"
        log = (data_dir / "pitr_restore.log").read_text()
        assert "wal-fetch: restored" in log and f"s3://{bucket}/wal/main" in log
    finally:
        if restored is not None:
            restored.pg_ctl("-m", "immediate", "stop")
        setup.close()
