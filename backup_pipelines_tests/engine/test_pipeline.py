"""Backups against a real PostgreSQL: round trips, files on disk, consistency, failure paths."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.artifacts import list_artifacts, list_partials
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.drills.logical import restore_test
from backup_pipelines.engine.errors import BackupFailedError, DatabaseUnreachableError, ToolError
from backup_pipelines.engine.postgres import find_tools
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import assert_same_database, restore_and_compare

log = logging.getLogger("test")

FORMATS = [
    ("plain", "gzip"),
    ("plain", "zstd"),
    ("plain", "none"),
    ("custom", "gzip"),
    ("custom", "zstd"),
]


@pytest.mark.parametrize(("dump_format", "compression"), FORMATS)
def test_round_trip_restores_identical_data(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    tmp_path: Path,
    dump_format: str,
    compression: str,
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    target = config.target("prod")
    artifact = run_backup(target, log=log)

    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")


def test_backup_files_layout_permissions_and_metadata(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    artifact = run_backup(config.target("prod"), log=log)
    backup_dir = config.target("prod").backup_dir

    assert artifact.path.parent == backup_dir
    assert artifact.path.name.startswith(f"{sample_db}_") and artifact.path.name.endswith(".sql.gz")
    stamp = artifact.path.name[len(sample_db) + 1 : -len(".sql.gz")]
    assert time.strptime(stamp, "%Y%m%d_%H%M%S")
    for path in (artifact.path, artifact.sha256_path, artifact.meta_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (backup_dir, backup_dir.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert not list_partials(backup_dir)

    # sha256sum -c passes in that folder, as the guide documents.
    check = subprocess.run(
        ["sha256sum", "-c", artifact.sha256_path.name],
        cwd=backup_dir,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    meta = json.loads(artifact.meta_path.read_text())
    for key in (
        "target",
        "database",
        "server_version",
        "pg_dump_version",
        "format",
        "compression",
        "size_bytes",
        "sha256",
        "started_at",
        "finished_at",
        "duration_seconds",
        "row_counts",
        "tool_version",
    ):
        assert key in meta, key
    assert meta["target"] == "prod" and meta["database"] == sample_db
    assert meta["size_bytes"] == artifact.path.stat().st_size
    assert meta["row_counts"]["hr.employee"] == 300
    assert meta["row_counts"]["scheduling.shift"] == 3000
    assert (
        meta["row_counts"]["payroll.audit_log_2025"] + meta["row_counts"]["payroll.audit_log_2026"]
        == 300
    )
    assert (
        "payroll.audit_log" not in meta["row_counts"]
    )  # a partitioned parent holds no rows itself
    assert "pg_dump (PostgreSQL) 15" in meta["pg_dump_version"]


def test_plain_gzip_backup_restores_by_hand_with_gunzip_and_psql(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    artifact = run_backup(config.target("prod"), log=log)
    manual = f"{sample_db}_manual"
    pg.psql(f'CREATE DATABASE "{manual}"')
    try:
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
        pipeline = (
            f"gunzip -c '{artifact.path}' | {pg.bin_dir}/psql -X -q -v ON_ERROR_STOP=1 --single-transaction "
            f"-h 127.0.0.1 -p {pg.port} -U postgres -d {manual}"
        )
        subprocess.run(
            ["bash", "-o", "pipefail", "-c", pipeline], check=True, env=env, capture_output=True
        )
        assert_same_database(pg, sample_db, manual)
    finally:
        pg.psql(f'DROP DATABASE "{manual}" WITH (FORCE)')


def test_row_counts_match_the_dump_exactly_on_a_busy_database(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    """Writers keep inserting during the backup; the snapshot-consistent counts still match the restore."""
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        with psycopg.connect(
            ConnectionInfo.parse(pg.dsn(sample_db)).conninfo(), autocommit=True
        ) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO payroll.audit_log VALUES (now(), 'writer', 'edit', '{}')")
                inserted[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        artifact = run_backup(config.target("prod"), log=log)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert inserted[0] > 0
    result = restore_test(config.target("prod"), artifact, log=log)
    assert result.passed, result.summary()
    assert result.rows_checked == artifact.meta.total_rows


def test_restore_test_detects_a_count_mismatch(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    artifact = run_backup(config.target("prod"), log=log)
    wrong = artifact.meta.model_copy(
        update={"row_counts": {**artifact.meta.row_counts, "hr.employee": 301}}
    )
    result = restore_test(config.target("prod"), type(artifact)(artifact.path, wrong), log=log)
    assert not result.passed
    assert result.mismatches == {"hr.employee": {"expected": 301, "restored": 300}}
    assert "hr.employee: expected 301, restored 300" in result.summary()
    leftovers = pg.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'bp_test_%'")
    assert leftovers == "0"


def test_unreachable_database_is_a_clear_error_and_leaves_nothing(make_project) -> None:
    port = free_port()
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD"}},
        env={"DB_PROD": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{port}/app"},
    )
    with pytest.raises(DatabaseUnreachableError) as info:
        run_backup(config.target("prod"), log=log)
    message = str(info.value)
    assert f"cannot connect to app@127.0.0.1:{port}/app" in message
    assert "server is running" in message
    assert DB_PASSWORD not in message
    assert not list_artifacts(config.target("prod").backup_dir)


def test_bad_credentials_are_a_clear_error(pg: LocalCluster, sample_db: str, make_project) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD"}},
        env={"DB_PROD": pg.dsn(sample_db, password="wrong-password")},
    )
    with pytest.raises(DatabaseUnreachableError) as info:
        run_backup(config.target("prod"), log=log)
    assert "password authentication failed" in str(info.value)
    assert "wrong-password" not in str(info.value)


def test_pg_dump_older_than_the_server_is_refused() -> None:
    with pytest.raises(ToolError) as info:
        find_tools(99)
    assert "is older than the server (PostgreSQL 99)" in str(info.value)
    assert "postgresql-client-99" in str(info.value)


def test_pg_dump_failure_leaves_no_file(pg: LocalCluster, sample_db: str, make_project) -> None:
    """A role that cannot read a table makes pg_dump fail: no backup file, a clear message."""
    pg.psql(
        f"DROP ROLE IF EXISTS limited_{sample_db[-6:]}; CREATE ROLE limited_{sample_db[-6:]} LOGIN PASSWORD 'limited-pw'"
    )
    role = f"limited_{sample_db[-6:]}"
    pg.psql(f'GRANT CONNECT ON DATABASE "{sample_db}" TO {role}')
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD"}},
        env={"DB_PROD": pg.dsn(sample_db, user=role, password="limited-pw")},
    )
    with pytest.raises(BackupFailedError) as info:
        run_backup(config.target("prod"), log=log)
    assert "pg_dump failed" in str(info.value) and "permission denied" in str(info.value)
    backup_dir = config.target("prod").backup_dir
    assert [p.name for p in backup_dir.iterdir() if p.name != ".lock"] == []
    pg.psql(f'REVOKE ALL ON DATABASE "{sample_db}" FROM {role}; DROP ROLE {role}')


def test_full_disk_fails_cleanly(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount_point)]
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount tmpfs here")
    try:
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "compression": "none"}},
            env={"DB_PROD": pg.dsn(sample_db)},
            backup_root=str(mount_point),
        )
        with pytest.raises(BackupFailedError) as info:
            run_backup(config.target("prod"), log=log)
        assert "disk full" in str(info.value) and "free space" in str(info.value)
        leftovers = [p.name for p in (mount_point / "prod").iterdir() if p.name != ".lock"]
        assert leftovers == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_error_met_while_writing_back_early_fails_the_backup(
    pg: LocalCluster, sample_db: str, make_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data is pushed to the disk in the background while the dump runs; the kernel reports
    a write error to one sync only, so an error met there must still fail the backup."""
    from backup_pipelines.engine.backup import files

    synced: list[int] = []

    def failing_fdatasync(fd: int) -> None:
        synced.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "WRITEBACK_EVERY", 64 << 10)
    monkeypatch.setattr(files.os, "fdatasync", failing_fdatasync)
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "compression": "none"}}, env={"DB_PROD": pg.dsn(sample_db)}
    )
    with pytest.raises(BackupFailedError) as info:
        run_backup(config.target("prod"), log=log)
    assert synced, "the dump is larger than the writeback step, so a background sync ran"
    assert "Input/output error" in str(info.value)
    backup_dir = config.target("prod").backup_dir
    assert [p.name for p in backup_dir.iterdir() if p.name != ".lock"] == []


def test_a_share_that_cannot_fsync_folders_still_takes_backups(
    pg: LocalCluster, sample_db: str, make_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SMB/CIFS shares and some FUSE filesystems answer fsync on a folder with EINVAL (the
    kernel's way of saying "not supported"). PostgreSQL accepts that; so do we: every backup
    on such a share failed after the dump."""
    from backup_pipelines.engine import fsutil

    real_fsync = os.fsync
    refused: list[int] = []

    def share_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", share_fsync)
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    artifact = run_backup(config.target("prod"), log=log)
    assert refused, "the backup's renames asked for their folder to be synced"
    assert all(outcome.passed for outcome in verify_artifact(artifact))


def test_early_writeback_keeps_every_byte_and_the_hash(
    pg: LocalCluster, sample_db: str, make_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backup_pipelines.engine.backup import files

    monkeypatch.setattr(files, "WRITEBACK_EVERY", 16 << 10)
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "compression": "none"}}, env={"DB_PROD": pg.dsn(sample_db)}
    )
    artifact = run_backup(config.target("prod"), log=log)
    data = artifact.path.read_bytes()
    assert len(data) == artifact.meta.size_bytes > 16 << 10
    assert hashlib.sha256(data).hexdigest() == artifact.meta.sha256
    assert b"-- PostgreSQL database dump complete" in data[-512:]


def test_a_backup_leaves_no_session_behind(pg: LocalCluster, sample_db: str, make_project) -> None:
    """The snapshot is held by a psql session while the dump runs; it ends with the backup."""
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    run_backup(config.target("prod"), log=log)
    # A backend ends a moment after its client disconnects: wait for it, a little.
    deadline = time.monotonic() + 5
    while True:
        left = pg.psql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            sample_db,
        )
        if left.strip() == "0" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left.strip() == "0"


def test_killed_backup_leaves_nothing_that_looks_complete(
    pg: LocalCluster, make_project, cli
) -> None:
    """SIGKILL mid-dump (no chance to clean up): only a .partial file may remain, and it is not a backup."""
    big = "bigdb_kill"
    pg.psql(f'DROP DATABASE IF EXISTS "{big}" WITH (FORCE)')
    pg.psql(f'CREATE DATABASE "{big}"')
    pg.psql(
        "CREATE TABLE filler AS SELECT g AS id, md5(g::text) || md5((g*2)::text) AS payload "
        "FROM generate_series(1, 1500000) g",
        big,
    )
    try:
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "compression": "none"}}, env={"DB_PROD": pg.dsn(big)}
        )
        backup_dir = config.target("prod").backup_dir
        proc = subprocess.Popen(
            [str(Path(os.sys.executable).parent / "backup-pipelines"), "backup", "prod"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partials = list_partials(backup_dir)
            # The dump's .partial (the globals' .partial beside it stays small).
            if partials and max(p.stat().st_size for p in partials) > 1 << 20:
                break
            time.sleep(0.02)
        else:
            pytest.fail("backup never started writing")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        names = sorted(p.name for p in backup_dir.iterdir() if p.name != ".lock")
        assert names and all(name.endswith(".partial") for name in names), names
        assert list_artifacts(backup_dir) == []
        listing = cli("list", "prod")
        # The dump's .partial, and the globals' if their capture (beside pg_dump) had begun.
        assert "no backups" in listing.stdout
        assert f"{len(names)} .partial leftover" in listing.stdout
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{big}" WITH (FORCE)')


def test_gzip_output_is_a_standard_gzip_file(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    artifact = run_backup(config.target("prod"), log=log)
    with gzip.open(artifact.path, "rb") as handle:
        text = handle.read()
    assert len(text) == artifact.meta.dump_bytes
    assert b"-- PostgreSQL database dump complete" in text[-200:]
    assert "Jürgen Müller".encode() in text
