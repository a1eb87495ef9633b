"""A backup blocked by a lock: it gives up after ``lock_wait_timeout`` and names who holds it.

Before, one session holding ``LOCK TABLE t IN ACCESS EXCLUSIVE MODE`` (a stuck migration) made
``backup-pipelines backup`` hang silently until the 12-hour run monitor killed it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import dagster as dg
import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import DEFAULT_LOCK_WAIT_TIMEOUT, TargetSettings
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupFailedError
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.fault_matrix.test_awkward_data import database_with
from backup_pipelines_tests.restore_helpers import backup_files

log = logging.getLogger("test")

TABLES_SQL = """
CREATE TABLE t (id int PRIMARY KEY, note text);
INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;
CREATE TABLE other (id int PRIMARY KEY);
INSERT INTO other SELECT generate_series(1, 10);
"""


@contextlib.contextmanager
def session(pg: LocalCluster, db: str, application: str) -> Iterator[psycopg.Connection]:
    info = ConnectionInfo.parse(pg.dsn(db))
    with psycopg.connect(info.conninfo(), application_name=application) as conn:
        yield conn


def _project(make_project, pg: LocalCluster, db: str, **settings: object):
    return make_project({"prod": {"dsn_env": "DB_PROD", **settings}}, env={"DB_PROD": pg.dsn(db)})


def test_backup_blocked_by_a_stuck_migration_gives_up_and_names_it(
    pg: LocalCluster, make_project, run_cli
) -> None:
    with database_with(pg, TABLES_SQL) as db:
        config = _project(make_project, pg, db, lock_wait_timeout="2s")
        folder = config.target("prod").backup_dir
        with session(pg, db, "stuck-migration") as holder:
            holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            pid = holder.info.backend_pid
            started = time.monotonic()
            result = run_cli("backup", "prod", timeout=120)
            elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr
        assert elapsed < 60
        err = result.stderr
        assert "Traceback" not in err
        assert "gave up after waiting 2s (lock_wait_timeout) for a table lock" in err
        assert f"pid {pid} (user 'postgres', application 'stuck-migration'" in err
        assert "in a transaction since 20" in err and "idle in transaction" in err
        assert "holding an ACCESS EXCLUSIVE lock on public.t" in err
        assert f"SELECT pg_terminate_backend({pid})" in err
        # Nothing that looks like a backup, not even a partial file.
        assert not list_artifacts(folder) and backup_files(folder) == []

        # Once the migration is gone, the next backup works.
        again = run_cli("backup", "prod", timeout=120)
        assert again.returncode == 0, again.stderr
        [artifact] = list_artifacts(folder)
        assert artifact.meta.row_counts == {"public.t": 100, "public.other": 10}


def test_a_migration_queued_behind_a_long_transaction_is_named_with_what_it_waits_for(
    pg: LocalCluster, make_project
) -> None:
    """The lock queue: DDL waiting behind a reader blocks the backup; both sessions are named."""
    with database_with(pg, TABLES_SQL) as db:
        config = _project(make_project, pg, db, lock_wait_timeout=2)
        with session(pg, db, "nightly-report") as reader, session(pg, db, "migrate") as ddl:
            reader.execute("SELECT count(*) FROM other")  # holds ACCESS SHARE, transaction open
            reader_pid, ddl_pid = reader.info.backend_pid, ddl.info.backend_pid
            queued = threading.Thread(
                target=lambda: ddl.execute("ALTER TABLE other ADD COLUMN flag boolean"),
                daemon=True,
            )
            queued.start()
            # Until the ALTER really waits in the lock queue (a fixed pause is a race when the
            # machine is busy: the backup could come first and never be blocked).
            deadline = time.monotonic() + 30
            while (
                pg.psql(f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {ddl_pid}")
                != "Lock"
            ):
                assert time.monotonic() < deadline, "the ALTER never queued for its lock"
                time.sleep(0.05)
            try:
                with pytest.raises(BackupFailedError) as info:
                    run_backup(config.target("prod"), log=log)
            finally:
                reader.rollback()
                queued.join(timeout=30)
            ddl.rollback()
        message = info.value.message
        assert f"pid {ddl_pid} (user 'postgres', application 'migrate'" in message
        assert "waiting since 20" in message
        assert "queued for an ACCESS EXCLUSIVE lock on public.other behind pid " in message
        assert f"pid {reader_pid} (user 'postgres', application 'nightly-report'" in message
        assert not list_artifacts(config.target("prod").backup_dir)


@pytest.mark.postgres
def test_a_forgotten_prepared_transaction_holding_the_lock_is_named(make_project) -> None:
    """Two-phase commit leftovers hold their locks with no session at all."""
    with throwaway_cluster(
        password=DB_PASSWORD, extra_conf={"max_prepared_transactions": "5"}
    ) as cluster:
        cluster.psql("CREATE DATABASE app")
        cluster.psql(TABLES_SQL, "app")
        cluster.psql(
            "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; PREPARE TRANSACTION 'stuck_2pc'", "app"
        )
        try:
            config = _project(make_project, cluster, "app", lock_wait_timeout="1s")
            with pytest.raises(BackupFailedError) as info:
                run_backup(config.target("prod"), log=log)
            message = info.value.message
            assert "a prepared transaction (virtual transaction " in message
            assert "holding an ACCESS EXCLUSIVE lock on public.t; see pg_prepared_xacts" in message
            assert not list_artifacts(config.target("prod").backup_dir)
        finally:
            cluster.psql("ROLLBACK PREPARED 'stuck_2pc'", "app")


def test_a_blocked_backup_fails_the_dagster_run_with_the_same_message(
    pg: LocalCluster, make_project
) -> None:
    from backup_pipelines.definitions import defs

    with database_with(pg, TABLES_SQL) as db:
        _project(make_project, pg, db, lock_wait_timeout="1s")
        job = defs().resolve_implicit_global_asset_job_def()
        with dg.instance_for_test() as instance, session(pg, db, "stuck-migration") as holder:
            holder.execute("LOCK TABLE other IN ACCESS EXCLUSIVE MODE")
            result = job.execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(["prod", "logical_backup"])],
                raise_on_error=False,
            )
            pid = holder.info.backend_pid
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        description = failure.step_failure_data.user_failure_data.description
        assert "gave up after waiting 1s (lock_wait_timeout) for a table lock" in description
        assert f"pid {pid} (user 'postgres', application 'stuck-migration'" in description
        assert "holding an ACCESS EXCLUSIVE lock on public.other" in description
        assert not result.get_asset_materialization_events()


def test_lock_wait_timeout_setting() -> None:
    settings = TargetSettings(dsn_env="DB")
    assert settings.lock_wait_timeout == DEFAULT_LOCK_WAIT_TIMEOUT == timedelta(minutes=5)
    assert TargetSettings(dsn_env="DB", lock_wait_timeout="90s").lock_wait_timeout == timedelta(
        seconds=90
    )
    assert TargetSettings(dsn_env="DB", lock_wait_timeout="off").lock_wait_timeout is None
    for bad in ("0s", "500ms", "2d", "soon"):
        with pytest.raises(ValueError, match="lock_wait_timeout|not a duration"):
            TargetSettings(dsn_env="DB", lock_wait_timeout=bad)
