"""Safe in-place restores against a real PostgreSQL: round trips, refusals, failures midway.

Every refusal and failure is checked the way an operator would trust it: the live database's
content fingerprint is byte-for-byte what it was, and no half-restored database is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts, load_artifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.confirm import ConfirmationError
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.restore import RestoreRefusedError, RestoreStepError, restore_database
from backup_pipelines.engine.restore.cleanup import drop_expired_previous_copies
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import (
    backup_files,
    connect_to,
    databases,
    forge_plain_backup,
    inject_before_first,
)

log = logging.getLogger("test")

CHANGE_SQL = "DELETE FROM scheduling.shift WHERE id % 3 = 0; UPDATE hr.employee SET notes = 'changed after the backup'"


def _project(make_project, pg: LocalCluster, db: str, **settings: object):
    return make_project({"prod": {"dsn_env": "DB_PROD", **settings}}, env={"DB_PROD": pg.dsn(db)})


@pytest.mark.parametrize(
    ("dump_format", "compression"),
    [("plain", "gzip"), ("plain", "zstd"), ("custom", "gzip"), ("custom", "zstd")],
)
def test_restore_replaces_database_with_backup_and_keeps_previous(
    pg: LocalCluster, sample_db: str, make_project, dump_format: str, compression: str
) -> None:
    config = _project(make_project, pg, sample_db, format=dump_format, compression=compression)
    backup = run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    pg.psql(CHANGE_SQL, sample_db)
    changed = fingerprint(pg, sample_db)
    assert changed != at_backup

    report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

    assert fingerprint(pg, sample_db) == at_backup
    assert report.previous_database and report.previous_database in databases(pg)
    assert fingerprint(pg, report.previous_database) == changed
    assert report.tables == len(backup.meta.row_counts) and report.rows == backup.meta.total_rows
    safety = load_artifact(report.safety_backup)
    assert safety.meta.purpose == "pre-restore"
    assert safety.meta.row_counts != backup.meta.row_counts  # it holds the changed state
    assert not any("_restoring_" in name for name in databases(pg))
    assert set(report.step_seconds) == {
        "locate",
        "verify",
        "safety_backup",
        "roles",
        "restore",
        "check",
        "swap",
    }
    pg.psql(f'DROP DATABASE "{report.previous_database}"')


def test_latest_skips_safety_backups_and_progress_is_reported(
    pg: LocalCluster, sample_db: str, make_project, caplog: pytest.LogCaptureFixture
) -> None:
    config = _project(make_project, pg, sample_db, format="custom", compression="zstd")
    run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    pg.psql(CHANGE_SQL, sample_db)

    caplog.set_level(logging.INFO, logger="test")
    first = restore_database(config, "prod", "latest", confirm="prod", log=log, progress_interval=0)
    # The newest file is now the pre-restore safety backup; "latest" must still mean the backup.
    assert list_artifacts(config.target("prod").backup_dir)[0].meta.purpose == "pre-restore"
    second = restore_database(config, "prod", "latest", confirm="prod", log=log)

    assert first.backup == second.backup
    assert fingerprint(pg, sample_db) == at_backup
    progress = [r.message for r in caplog.records if "progress" in r.message]
    assert any("Decoding archive progress" in m for m in progress)
    assert any(
        m.startswith("pg_restore progress") and "items" in m and "done" in m for m in progress
    )
    for report in (first, second):
        pg.psql(f'DROP DATABASE "{report.previous_database}"')


def test_open_connections_are_terminated_and_restore_succeeds(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = _project(make_project, pg, sample_db)
    backup = run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    idle = connect_to(pg, sample_db, autocommit=True)
    busy = connect_to(pg, sample_db)
    busy.execute("SELECT count(*) FROM hr.employee")  # leaves a transaction open
    pg.psql(CHANGE_SQL, sample_db)

    report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

    assert report.terminated_sessions >= 2
    for conn in (idle, busy):
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()
    assert fingerprint(pg, sample_db) == at_backup
    # Applications can connect again to the restored database under the same name.
    with connect_to(pg, sample_db) as conn:
        assert conn.execute("SELECT count(*) FROM hr.employee").fetchone()[0] > 0
    pg.psql(f'DROP DATABASE "{report.previous_database}"')


@pytest.fixture
def prod_backup(pg: LocalCluster, sample_db: str, make_project):
    config = _project(make_project, pg, sample_db)
    backup = run_backup(config.target("prod"), log=log)
    pg.psql(CHANGE_SQL, sample_db)
    return config, backup


def _assert_untouched(pg: LocalCluster, db: str, before_fp: dict, before_dbs: set[str]) -> None:
    assert fingerprint(pg, db) == before_fp
    assert databases(pg) == before_dbs
    assert pg.psql(f"SELECT datallowconn FROM pg_database WHERE datname = '{db}'") == "t"


@pytest.mark.parametrize(
    ("confirm", "expected"),
    [(None, "without confirmation"), ("production", "does not match the target")],
)
def test_missing_or_wrong_confirmation_touches_nothing(
    pg: LocalCluster, sample_db: str, prod_backup, confirm: str | None, expected: str
) -> None:
    config, backup = prod_backup
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)
    files_before = backup_files(config.target("prod").backup_dir)

    with pytest.raises(ConfirmationError, match=expected):
        restore_database(config, "prod", str(backup.path), confirm=confirm, log=log)

    _assert_untouched(pg, sample_db, before_fp, before_dbs)
    assert backup_files(config.target("prod").backup_dir) == files_before  # no safety backup


def test_corrupt_backup_is_refused_before_anything_is_touched(
    pg: LocalCluster, sample_db: str, prod_backup
) -> None:
    config, backup = prod_backup
    data = bytearray(backup.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup.path.write_bytes(bytes(data))
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with pytest.raises(RestoreStepError) as caught:
        restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

    assert caught.value.step == "verify"
    assert "SHA-256 mismatch" in str(caught.value) and "was not changed" in str(caught.value)
    assert caught.value.safety_backup is None
    _assert_untouched(pg, sample_db, before_fp, before_dbs)
    assert [a.meta.purpose for a in list_artifacts(config.target("prod").backup_dir)] == [
        "scheduled"
    ]


def test_backup_of_another_database_is_refused(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    other = f"{sample_db}_other"
    pg.psql(f'CREATE DATABASE "{other}" TEMPLATE "{sample_db}"')
    try:
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD"}, "other": {"dsn_env": "DB_OTHER"}},
            env={"DB_PROD": pg.dsn(sample_db), "DB_OTHER": pg.dsn(other)},
        )
        foreign = run_backup(config.target("other"), log=log)
        pg.psql(CHANGE_SQL, sample_db)
        before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

        with pytest.raises(
            RestoreRefusedError, match=rf"backup of database '{other}' \(target 'other'\)"
        ):
            restore_database(config, "prod", str(foreign.path), confirm="prod", log=log)

        _assert_untouched(pg, sample_db, before_fp, before_dbs)
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def test_backup_outside_root_and_unknown_target_are_refused(
    pg: LocalCluster, sample_db: str, prod_backup, tmp_path: Path
) -> None:
    config, backup = prod_backup
    stray_dir = tmp_path / "elsewhere"
    stray_dir.mkdir()
    for source in (backup.path, backup.sha256_path, backup.meta_path):
        (stray_dir / source.name).write_bytes(source.read_bytes())
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with pytest.raises(RestoreRefusedError, match="outside the backup root"):
        restore_database(config, "prod", str(stray_dir / backup.path.name), confirm="prod", log=log)
    # A relative path that climbs out of the root is caught after resolving it.
    sneaky = f"{config.resolved_backup_root}/prod/../../elsewhere/{backup.path.name}"
    with pytest.raises(RestoreRefusedError, match="outside the backup root"):
        restore_database(config, "prod", sneaky, confirm="prod", log=log)
    with pytest.raises(ConfigError, match="unknown target 'staging'"):
        restore_database(config, "staging", str(backup.path), confirm="staging", log=log)

    _assert_untouched(pg, sample_db, before_fp, before_dbs)


def test_restore_failing_midway_keeps_original_and_safety_backup(
    pg: LocalCluster, sample_db: str, prod_backup
) -> None:
    config, backup = prod_backup
    broken = forge_plain_backup(
        backup,
        inject_before_first(b"CREATE TABLE hr.employee", b"SELECT 1/0; -- fails on purpose\n"),
    )
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with pytest.raises(RestoreStepError) as caught:
        restore_database(config, "prod", str(broken), confirm="prod", log=log)

    error = caught.value
    assert error.step == "restore"
    assert "division by zero" in str(error)
    assert error.safety_backup and error.safety_backup in str(error)
    safety = load_artifact(error.safety_backup)
    assert safety.meta.purpose == "pre-restore"
    assert safety.meta.row_counts != backup.meta.row_counts  # the live state, not the backup's
    assert safety.path.exists() and safety.sha256_path.exists()
    _assert_untouched(pg, sample_db, before_fp, before_dbs)


def test_row_count_mismatch_stops_before_the_swap(
    pg: LocalCluster, sample_db: str, prod_backup
) -> None:
    config, backup = prod_backup
    # The SQL restores cleanly but deletes rows: only the count check can notice.
    broken = forge_plain_backup(
        backup,
        lambda dump: dump.replace(
            b"-- PostgreSQL database dump complete",
            b"DELETE FROM scheduling.time_off_request WHERE id % 2 = 0;\n-- PostgreSQL database dump complete",
        ),
    )
    before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

    with pytest.raises(RestoreStepError) as caught:
        restore_database(config, "prod", str(broken), confirm="prod", log=log)

    assert caught.value.step == "check"
    assert "scheduling.time_off_request: expected" in str(caught.value)
    _assert_untouched(pg, sample_db, before_fp, before_dbs)


def test_missing_database_is_created_without_safety_backup(
    pg: LocalCluster, sample_db: str, prod_backup
) -> None:
    config, backup = prod_backup
    pg.psql(f'DROP DATABASE "{sample_db}" WITH (FORCE)')

    report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

    assert report.safety_backup is None and report.previous_database is None
    assert sample_db in databases(pg)
    with connect_to(pg, sample_db) as conn:
        assert (
            conn.execute("SELECT count(*) FROM hr.employee").fetchone()[0]
            == backup.meta.row_counts["hr.employee"]
        )


def test_database_properties_survive_and_grace_period_drops_old_copies(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    role = f"app_{sample_db}"[:60]
    pg.psql(f'CREATE ROLE "{role}" LOGIN')
    try:
        pg.psql(
            f'REVOKE ALL ON DATABASE "{sample_db}" FROM PUBLIC; '
            f'GRANT CONNECT ON DATABASE "{sample_db}" TO "{role}"; '
            f"ALTER DATABASE \"{sample_db}\" SET statement_timeout = '42s'; "
            f'ALTER ROLE "{role}" IN DATABASE "{sample_db}" SET work_mem = \'5MB\''
        )
        config = _project(make_project, pg, sample_db, restore={"drop_previous_after_hours": 1})
        backup = run_backup(config.target("prod"), log=log)

        report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

        acl = pg.psql(f"SELECT datacl FROM pg_database WHERE datname = '{sample_db}'")
        entries = acl.strip("{}").split(",")
        assert any(e.startswith(f"{role}=c/") for e in entries)
        assert not any(e.startswith("=") for e in entries)  # PUBLIC stays revoked
        settings = pg.psql(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            f"WHERE d.datname = '{sample_db}' ORDER BY s.setrole"
        )
        assert "statement_timeout=42s" in settings and "work_mem=5MB" in settings
        # Within the grace period the replaced database stays; after it, it is dropped.
        target = config.target("prod")
        assert drop_expired_previous_copies(target, log=log) == []
        assert report.previous_database in databases(pg)
        later = datetime.now(UTC) + timedelta(hours=2)
        assert drop_expired_previous_copies(target, log=log, now=later) == [
            report.previous_database
        ]
        assert report.previous_database not in databases(pg)
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{sample_db}" WITH (FORCE)')
        pg.psql(f'DROP ROLE IF EXISTS "{role}"', check=False)


def test_grace_period_zero_drops_previous_right_away(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = _project(make_project, pg, sample_db, restore={"drop_previous_after_hours": 0})
    backup = run_backup(config.target("prod"), log=log)
    before = databases(pg)

    report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)

    assert report.previous_dropped and databases(pg) == before


def test_restoring_the_maintenance_database_is_refused(pg: LocalCluster, make_project) -> None:
    config = make_project({"admin": {"dsn_env": "DB_ADMIN"}}, env={"DB_ADMIN": pg.dsn("postgres")})
    with pytest.raises(RestoreRefusedError, match="maintenance database") as caught:
        restore_database(config, "admin", "latest", confirm="admin", log=log)
    assert "template1" in str(caught.value)


def test_password_never_in_argv_logs_or_errors(
    pg: LocalCluster, sample_db: str, make_project, caplog: pytest.LogCaptureFixture
) -> None:
    config = _project(make_project, pg, sample_db, format="custom", compression="gzip")
    backup = run_backup(config.target("prod"), log=log)
    seen: list[str] = []
    stop = threading.Event()

    def watch_processes() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        seen.append(
                            Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
                        )
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_processes, daemon=True)
    watcher.start()
    caplog.set_level(logging.DEBUG)
    try:
        report = restore_database(
            config, "prod", str(backup.path), confirm="prod", log=log, progress_interval=0
        )
        config = _project(make_project, pg, sample_db, format="plain")
        plain = run_backup(config.target("prod"), log=log)
        broken = forge_plain_backup(plain, inject_before_first(b"CREATE TABLE", b"SELECT 1/0;\n"))
        with pytest.raises(RestoreStepError) as caught:
            restore_database(config, "prod", str(broken), confirm="prod", log=log)
    finally:
        stop.set()
        watcher.join()
    # The watcher did see both restore tools at work.
    assert any("pg_restore" in cmd for cmd in seen) and any("psql" in cmd for cmd in seen)
    # Custom format restores in parallel (restore_jobs, default 2).
    assert any("pg_restore" in cmd and "--jobs=2" in cmd for cmd in seen)
    assert not [cmd for cmd in seen if DB_PASSWORD in cmd]
    assert DB_PASSWORD not in caplog.text and DB_PASSWORD not in str(caught.value)
    assert DB_PASSWORD not in report.summary()
    pg.psql(f'DROP DATABASE "{report.previous_database}"')
