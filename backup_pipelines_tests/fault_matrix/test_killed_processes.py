"""Fault matrix, killed processes: ``kill -9`` of a real ``backup-pipelines`` process mid-backup
and mid-restore (no chance to clean up), and PostgreSQL stopped (``pg_ctl stop -m immediate``)
in the middle of a dump.

Nothing may be lost: no file that looks like a backup, the previous backups intact, the live
database untouched, and what the dead run left is found and removed by the documented
housekeeping (``prune`` for ``.partial`` files, ``restore-cleanup`` for ``_restoring_``
databases), after which the next run works.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.engine.artifacts import list_artifacts, list_partials
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.restore import RestoreRefusedError
from backup_pipelines.engine.restore.cleanup import restore_cleanup
from backup_pipelines.engine.retention import prune_target
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.fault_matrix.support import (
    EXIT_FAILED,
    EXIT_REFUSED,
    assert_clear_failure,
    assert_clear_message,
)
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import backup_files, databases

# Big enough that a dump and a restore last well beyond the moment we kill them (seconds even
# on an idle machine), small enough to build in a few seconds.
FILLER_ROWS = 300_000
FILLER_SQL = (
    "CREATE TABLE filler (id int PRIMARY KEY, v bigint NOT NULL, note text NOT NULL);"
    f"INSERT INTO filler SELECT g, (g::bigint * 7919) % 1000003, 'row ' || g "
    f"FROM generate_series(1, {FILLER_ROWS}) g;"
    "CREATE INDEX filler_v_idx ON filler (v);"
    "CREATE TABLE small (id int PRIMARY KEY, name text); "
    "INSERT INTO small VALUES (1, 'Jürgen'), (2, 'O''Brien')"
)


@pytest.fixture(scope="module")
def big_template(pg: LocalCluster) -> Iterator[str]:
    """A database to copy from (CREATE DATABASE ... TEMPLATE is a fast file copy)."""
    name = f"fm_big_{os.getpid()}"
    pg.psql(f'DROP DATABASE IF EXISTS "{name}"')
    pg.psql(f'CREATE DATABASE "{name}"')
    pg.psql(FILLER_SQL, name)
    yield name
    pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def big_db(pg: LocalCluster, big_template: str) -> Iterator[str]:
    name = f"fm_live_{os.getpid()}_{time.monotonic_ns() % 100000}"
    pg.psql(f'CREATE DATABASE "{name}" TEMPLATE "{big_template}"')
    yield name
    for other in databases(pg):
        if other == name or other.startswith(f"{name}_"):
            pg.psql(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_sessions_gone(pg: LocalCluster, where: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}") != "0":
        assert time.monotonic() < deadline, f"sessions ({where}) did not end"
        time.sleep(0.1)


def test_kill_9_mid_backup_leaves_only_a_partial_that_prune_removes_by_age(
    pg: LocalCluster, big_db: str, make_project, cli
) -> None:  # type: ignore[no-untyped-def]
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "compression": "none",
                "retention": {"partial_max_age_hours": 1},
            }
        },
        env={"DB_PROD": pg.dsn(big_db)},
    )
    backup_dir = config.target("prod").backup_dir
    previous = run_backup(config.target("prod"))
    previous_files = {p.name: _sha256(p) for p in backup_files(backup_dir)}

    proc = _start("backup", "prod")
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 1 << 20 for p in list_partials(backup_dir)):
            assert proc.poll() is None, "the backup ended before it could be killed"
            assert time.monotonic() < deadline, "the backup never started writing"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # pg_dump loses its reader and dies of SIGPIPE; its session ends.
    _wait_sessions_gone(pg, f"datname = '{big_db}' AND application_name = 'pg_dump'")

    partials = list_partials(backup_dir)
    # The dump's .partial, and the globals' if their capture (beside pg_dump) had begun.
    [partial] = [p for p in partials if ".globals" not in p.name]
    assert len(partials) in (1, 2)
    now = {p.name: p for p in backup_files(backup_dir)}
    assert set(now) == set(previous_files) | {p.name for p in partials}
    assert {n: _sha256(p) for n, p in now.items() if n in previous_files} == previous_files
    assert [a.path for a in list_artifacts(backup_dir)] == [previous.path]
    listing = cli("list", "prod")
    assert listing.returncode == 0, listing.stderr
    assert previous.path.name in listing.stdout and partial.name not in listing.stdout
    assert f"{len(partials)} .partial leftover" in listing.stdout
    refused = cli("verify", str(partial))
    assert_clear_failure(refused, EXIT_FAILED, "leftover of an interrupted backup")

    # The dead holder released the lock: the next backup works and is complete.
    newest = run_backup(config.target("prod"))
    assert all(o.passed for o in verify_artifact(newest))
    assert len(list_artifacts(backup_dir)) == 2

    # Retention removes the leftover by age only: not while it is young, once it is old.
    young = prune_target(config.target("prod"))
    assert partial.exists() and young.leftovers_removed == []
    old = time.time() - 2 * 3600
    for leftover in partials:
        os.utime(leftover, (old, old))
    aged = cli("prune", "prod")
    assert aged.returncode == 0, aged.stderr
    assert f"removed leftover {partial}" in aged.stdout
    assert not partial.exists() and not list_partials(backup_dir)
    assert newest.path.exists() and _sha256(newest.path) == newest.meta.sha256


def test_kill_9_mid_restore_leaves_live_database_and_restore_cleanup_drops_the_leftover(
    pg: LocalCluster, big_db: str, make_project, cli
) -> None:  # type: ignore[no-untyped-def]
    config = make_project(
        {
            "prod": {
                # Custom format around zstd: the restore decodes the archive into the work
                # folder first (pg_restore -j needs a seekable file), which a kill leaves too.
                "dsn_env": "DB_PROD",
                "format": "custom",
                "compression": "zstd",
                "restore": {"drop_previous_after_hours": 24},
            }
        },
        env={"DB_PROD": pg.dsn(big_db)},
    )
    target = config.target("prod")
    work = config.resolved_backup_root / ".work"
    backup = run_backup(target)
    at_backup = fingerprint(pg, big_db)
    pg.psql("DELETE FROM filler WHERE id % 3 = 0; UPDATE small SET name = 'changed'", big_db)
    before = fingerprint(pg, big_db)
    assert before != at_backup

    proc = _start("restore", str(backup.path), "prod", "--confirm", "prod")
    try:
        deadline = time.monotonic() + 120
        while pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE "
            f"'{big_db}\\_restoring\\_%' AND query LIKE 'COPY%'"
        ) in ("", "0"):
            assert proc.poll() is None, "the restore ended before it could be killed"
            assert time.monotonic() < deadline, "the restore never started loading data"
            time.sleep(0.02)
        # While the restore runs, restore-cleanup refuses and drops nothing.
        with pytest.raises(RestoreRefusedError) as refused:
            restore_cleanup(target)
        assert refused.value.exit_code == 2
        assert_clear_message(str(refused.value), "another restore of target 'prod' is running")
        assert "nothing was dropped" in str(refused.value)
        # So does a second restore of the same target.
        second = cli("restore", str(backup.path), "prod", "--confirm", "prod")
        assert_clear_failure(second, EXIT_REFUSED, "another restore of target 'prod' is running")
        assert proc.poll() is None, "the restore finished during the checks: make it bigger"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # only the CLI: pg_restore is left to notice alone
        proc.wait()
    [leftover] = [d for d in databases(pg) if d.startswith(f"{big_db}_restoring_")]
    [spool] = [p for p in work.iterdir() if p.name.startswith(f"restore-{proc.pid}@")]
    assert fingerprint(pg, big_db) == before
    # pg_restore lost its stderr reader and ended; a session still running would be left alone.
    _wait_sessions_gone(pg, f"datname = '{leftover}'")

    # Leftovers of a restore killed between CREATE DATABASE and its label look exactly like
    # ours; a database someone else labelled is not ours, whatever its name.
    unlabelled = f"{big_db}_restoring_20200101_000000"
    foreign = f"{big_db}_restoring_20200101_000001"
    pg.psql(f'CREATE DATABASE "{unlabelled}"')
    pg.psql(f'CREATE DATABASE "{foreign}"')
    pg.psql(f"COMMENT ON DATABASE \"{foreign}\" IS 'reporting copy, keep'")

    cleanup = cli("restore-cleanup", "prod")
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"dropped {leftover} (left by an interrupted restore)" in cleanup.stdout
    assert f"dropped {unlabelled}" in cleanup.stdout
    assert f"removed {spool} (temporary files" in cleanup.stdout and not spool.exists()
    after = databases(pg)
    assert leftover not in after and unlabelled not in after
    assert foreign in after and big_db in after
    assert fingerprint(pg, big_db) == before

    # The next restore works, and restore-cleanup keeps the replaced database in its grace period.
    again = cli("restore", str(backup.path), "prod", "--confirm", "prod")
    assert again.returncode == 0, again.stderr
    assert fingerprint(pg, big_db) == at_backup
    previous = again.stdout.split("previous database kept as: ")[1].split()[0]
    kept = cli("restore-cleanup", "prod")
    assert kept.returncode == 0, kept.stderr
    assert f"kept {previous}" in kept.stdout and "nothing to drop" in kept.stdout
    assert previous in databases(pg)
    assert fingerprint(pg, big_db) == at_backup
    pg.psql(f'DROP DATABASE "{foreign}"')


@pytest.mark.postgres
def test_postgres_stopped_mid_dump_fails_clearly_and_leaves_no_backup(
    make_project,
) -> None:  # type: ignore[no-untyped-def]
    """The database server goes away in the middle of a dump (its own cluster: it is killed)."""
    with throwaway_cluster(password="pw-stop") as server:
        server.psql("CREATE DATABASE app")
        server.psql(FILLER_SQL, "app")
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "compression": "none"}},
            env={"DB_PROD": server.dsn("app")},
        )
        backup_dir = config.target("prod").backup_dir
        good = run_backup(config.target("prod"))
        good_sha = _sha256(good.path)

        proc = subprocess.Popen(
            [str(VENV_BIN / "backup-pipelines"), "backup", "prod"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 1 << 20 for p in list_partials(backup_dir)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup never started writing"
            time.sleep(0.02)
        server.pg_ctl("-m", "immediate", "-w", "stop")
        stdout, stderr = proc.communicate(timeout=60)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert_clear_failure(result, EXIT_FAILED, "pg_dump failed for target 'prod'")
        assert "pw-stop" not in stdout + stderr

        # Nothing complete-looking, not even a .partial: the failure path removed it.
        assert [p.name for p in backup_files(backup_dir)] == sorted(
            p.name for p in (good.path, *good.sidecars)
        )
        assert [a.path for a in list_artifacts(backup_dir)] == [good.path]
        assert _sha256(good.path) == good_sha

        # The server comes back: the next backup works.
        server.start()
        run_backup(config.target("prod"))
        assert len(list_artifacts(backup_dir)) == 2


def test_restore_cleanup_with_an_unreachable_server_is_one_clear_line(make_project, cli) -> None:  # type: ignore[no-untyped-def]
    from backup_pipelines.devtools.local_postgres import free_port

    make_project(
        {"prod": {"dsn_env": "DB_PROD"}},
        env={"DB_PROD": f"postgresql://u:pw-x@127.0.0.1:{free_port()}/app"},
    )
    result = cli("restore-cleanup", "prod")
    assert_clear_failure(result, EXIT_FAILED, "127.0.0.1")
    assert "pw-x" not in result.stdout + result.stderr
