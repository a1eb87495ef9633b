"""``format: directory`` (pg_dump -Fd -j N) as one artifact: backup, counts, restore, verify."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import threading
from pathlib import Path

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import (
    backup_file_name,
    list_artifacts,
    list_partials,
    load_artifact,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.backup.directory import TOC_NAME
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.drills.logical import restore_test
from backup_pipelines.engine.encryption import EncryptionError
from backup_pipelines.engine.errors import BackupFailedError
from backup_pipelines.engine.postgres import connect, table_row_counts
from backup_pipelines.engine.reader import dump_chunks
from backup_pipelines.engine.verify import check_readable, verify_artifact
from backup_pipelines_tests.helpers import restore_and_compare

log = logging.getLogger("test")


def _project(make_project, pg: LocalCluster, db: str, **settings: object):
    return make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": "directory", **settings}},
        env={"DB_PROD": pg.dsn(db)},
    )


def _exact_counts(pg: LocalCluster, db: str) -> dict[str, int]:
    with connect(ConnectionInfo.parse(pg.dsn(db))) as conn:
        return table_row_counts(conn)


def _tar_members(artifact) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    with tarfile.open(fileobj=io.BytesIO(b"".join(dump_chunks(artifact))), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("compression", "extension"),
    [("gzip", ".dir.tar"), ("zstd", ".dir.tar.zst"), ("none", ".dir.tar")],
)
def test_directory_backup_round_trip_counts_and_verify(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    compression: str,
    extension: str,
) -> None:
    config = _project(make_project, pg, sample_db, compression=compression, jobs=3)
    target = config.target("prod")

    with caplog.at_level(logging.WARNING):
        artifact = run_backup(target, log=log)

    assert artifact.path.name.endswith(extension)
    assert [a.path for a in list_artifacts(target.backup_dir)] == [artifact.path]
    assert not list_partials(target.backup_dir)
    assert not any((target.backup_dir / ".work").iterdir())  # pg_dump's folder is gone
    # Counted from the data files (no fallback to a count(*) scan), exactly what count(*) sees
    # on the awkward sample data (newlines and backslashes in values, partitions, ...).
    assert "counting the rows in the dump's snapshot" not in caplog.text
    assert artifact.meta.row_counts == _exact_counts(pg, sample_db)
    assert artifact.meta.format == "directory" and artifact.meta.compression == compression
    members = _tar_members(artifact)
    assert next(iter(members)) == TOC_NAME
    data = [name for name in members if name[0].isdigit()]
    assert data and all(name.endswith(".dat.gz") == (compression == "gzip") for name in data)

    outcomes = verify_artifact(artifact)
    assert all(o.passed for o in outcomes), [o.message for o in outcomes]
    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")
    assert not any((tmp_path / "work").iterdir())  # the extracted folder is removed


def test_jobs_above_one_need_the_directory_format(make_project) -> None:
    from backup_pipelines.engine.errors import ConfigError

    for dump_format in ("custom", "plain"):
        with pytest.raises(ConfigError, match="jobs: 4 needs format: directory"):
            make_project({"prod": {"dsn_env": "DB_PROD", "format": dump_format, "jobs": 4}})
    one = make_project({"prod": {"dsn_env": "DB_PROD", "format": "custom", "jobs": 1}})
    assert one.target("prod").settings.dump_jobs == 1
    default = make_project({"prod": {"dsn_env": "DB_PROD", "format": "directory"}})
    assert default.target("prod").settings.dump_jobs == 2


def test_drill_and_encrypted_restore(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    encryption = {"mode": "passphrase", "passphrase_env": "BP_PASS"}
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": "directory", "encryption": encryption}},
        env={"DB_PROD": pg.dsn(sample_db), "BP_PASS": "directory passphrase 1"},
    )
    artifact = run_backup(config.target("prod"), log=log)
    assert artifact.path.name.endswith(".dir.tar.gpg")
    assert b"toc.dat" not in artifact.path.read_bytes()

    result = restore_test(config.target("prod"), artifact, log=log)
    assert result.passed, result.summary()
    assert result.rows_checked == artifact.meta.total_rows > 0
    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")

    make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": "directory", "encryption": encryption}},
        env={"DB_PROD": pg.dsn(sample_db), "BP_PASS": "not the right one"},
    )
    with pytest.raises(EncryptionError, match=artifact.meta.encryption["key_id"]):
        b"".join(dump_chunks(artifact))


def _forge(artifact, members: dict[str, bytes]) -> object:  # type: ignore[no-untyped-def]
    """A new backup holding ``members`` as its tar, checksum and .meta consistent with it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stored = buffer.getvalue()
    name = backup_file_name(
        artifact.meta.database, artifact.meta.started_at.replace(year=2001), ".dir.tar"
    )
    path = artifact.path.with_name(name)
    path.write_bytes(stored)
    digest = hashlib.sha256(stored).hexdigest()
    path.with_name(name + ".sha256").write_text(sha256_line(digest, name))
    meta = artifact.meta.model_copy(
        update={
            "file_name": name,
            "sha256": digest,
            "size_bytes": len(stored),
            "dump_bytes": len(stored),
        }
    )
    write_meta(path.with_name(name + ".meta"), meta)
    return load_artifact(path)


def test_verify_decodes_every_data_file(pg: LocalCluster, sample_db: str, make_project) -> None:
    config = _project(make_project, pg, sample_db, compression="gzip")
    artifact = run_backup(config.target("prod"), log=log)
    members = _tar_members(artifact)
    gz = max((n for n in members if n.endswith(".dat.gz")), key=lambda n: len(members[n]))
    assert check_readable(_forge(artifact, members)).passed  # the forgery itself is sound

    truncated = {**members, gz: members[gz][: len(members[gz]) // 2]}
    outcome = check_readable(_forge(artifact, truncated))
    assert not outcome.passed and gz in outcome.message and "truncated" in outcome.message

    flipped = bytearray(members[gz])
    flipped[len(flipped) // 2] ^= 0xFF
    outcome = check_readable(_forge(artifact, {**members, gz: bytes(flipped)}))
    assert not outcome.passed and gz in outcome.message

    missing = {name: data for name, data in members.items() if name != gz}
    outcome = check_readable(_forge(artifact, missing))
    assert not outcome.passed and gz.removesuffix(".gz") in outcome.message

    for evil in ("../evil.dat", "/etc/evil.dat", "sub/3803.dat", ".hidden"):
        outcome = check_readable(_forge(artifact, {**members, evil: b"x"}))
        assert not outcome.passed and repr(evil) in outcome.message, evil


def test_failed_backup_publishes_nothing_and_stale_folders_go(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = _project(make_project, pg, sample_db, lock_wait_timeout="1s")
    target = config.target("prod")
    stale = target.backup_dir / ".work" / "old.dir.tar.d"
    stale.mkdir(parents=True)
    (stale / "toc.dat").write_bytes(b"left by a killed backup")

    holding = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(ConnectionInfo.parse(pg.dsn(sample_db)).conninfo()) as conn:
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE hr.employee IN ACCESS EXCLUSIVE MODE")
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(BackupFailedError, match="lock_wait_timeout"):
            run_backup(target, log=log)
    finally:
        release.set()
        holder.join()
    assert not stale.exists()
    assert not list_artifacts(target.backup_dir) and not list_partials(target.backup_dir)
    assert [p.name for p in target.backup_dir.iterdir() if not p.name.startswith(".")] == []
    assert not any((target.backup_dir / ".work").iterdir())


def test_restore_cleanup_removes_dump_folders_of_killed_backups(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    from backup_pipelines.engine.restore.cleanup import restore_cleanup

    target = _project(make_project, pg, sample_db).target("prod")
    stale = target.backup_dir / ".work" / f"{sample_db}_20260101_000000.dir.tar.d"
    stale.mkdir(parents=True)
    (stale / "3803.dat").write_bytes(b"half a table")

    report = restore_cleanup(target, log=log)

    assert not stale.exists() and stale in report.work_dirs_removed


def test_rows_are_counted_while_the_files_grow(tmp_path: Path) -> None:
    """The follower reads data files as pg_dump's workers append to them (here: written in
    small pieces by a thread, gzip and plain), and counts exactly what they end up holding."""
    import gzip
    import time

    from backup_pipelines.engine.backup.directory import _FolderFollower

    rows = [
        f"{i}\tvalue with \\n escaped newline and \\\\. backslash-dot {i}\n" for i in range(5000)
    ]
    data = ("".join(rows) + "\\.\n\n\n").encode()
    packed = gzip.compress(data)
    follower = _FolderFollower(tmp_path)
    follower.start()

    def write(name: str, payload: bytes) -> None:
        with open(tmp_path / name, "wb", buffering=0) as handle:
            for start in range(0, len(payload), 4096):
                handle.write(payload[start : start + 4096])
                time.sleep(0.001)

    writers = [
        threading.Thread(target=write, args=("3001.dat.gz", packed)),
        threading.Thread(target=write, args=("3002.dat", data)),
    ]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    readers = follower.finish()
    follower.close()

    assert set(readers) == {"3001.dat.gz", "3002.dat"}
    for reader in readers.values():
        reader.finish()
        assert reader.complete and reader.rows == 5000
