"""Fault matrix, two backups of one target at once (a manual run beside the scheduled one).

The first backup is held mid-dump by a real lock on one of its tables (a long migration does
exactly that), so the two really overlap. The second refuses at once with one clear message
(exit 2, a refusal) and touches nothing; the first completes; the folder then holds exactly one
complete backup, which verifies and restores to the source's content.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts, list_partials
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.fault_matrix.support import EXIT_REFUSED, assert_clear_failure
from backup_pipelines_tests.helpers import restore_and_compare


def test_second_backup_of_a_target_refuses_while_the_first_completes(
    pg: LocalCluster, sample_db: str, make_project, cli, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup_dir = config.target("prod").backup_dir
    blocker = psycopg.connect(ConnectionInfo.parse(pg.dsn(sample_db)).conninfo())
    try:
        blocker.execute("LOCK TABLE hr.department IN ACCESS EXCLUSIVE MODE")
        first = subprocess.Popen(
            [str(VENV_BIN / "backup-pipelines"), "backup", "prod"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump' "
            f"AND datname = '{sample_db}' AND wait_event_type = 'Lock'"
        ) in ("", "0"):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first backup never reached the lock"
            time.sleep(0.05)

        second = cli("backup", "prod")
        assert_clear_failure(second, EXIT_REFUSED, "another backup of this target is running")
        assert first.poll() is None  # it was really running the whole time
        assert [p.name for p in list_partials(backup_dir)] != []  # the first one's, untouched
    finally:
        blocker.rollback()  # the "migration" ends: the first backup goes on
        blocker.close()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "checksum: ok" in stdout and "readable: ok" in stdout

    [artifact] = list_artifacts(backup_dir)
    assert list_partials(backup_dir) == []
    assert all(o.passed for o in verify_artifact(artifact))
    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")
