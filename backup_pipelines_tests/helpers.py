"""Assertions shared by tests: compare databases the way a user would trust a restore."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.postgres import content_fingerprint, find_tools
from backup_pipelines.engine.restore.database import create_database, drop_database
from backup_pipelines.engine.restore.runner import restore_into


def full_dump(cluster: LocalCluster, dbname: str, *options: str) -> str:
    """pg_dump's plain output without the per-run random \\restrict keys: equal text, equal database."""
    result = subprocess.run(
        [
            str(cluster.bin_dir / "pg_dump"),
            *options,
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            cluster.superuser,
            dbname,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PGPASSWORD": cluster.password or ""},
    )
    return "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def fingerprint(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    with psycopg.connect(ConnectionInfo.parse(cluster.dsn(dbname)).conninfo()) as conn:
        return content_fingerprint(conn)


def assert_same_database(cluster: LocalCluster, source: str, restored: str) -> None:
    source_fp, restored_fp = fingerprint(cluster, source), fingerprint(cluster, restored)
    assert source_fp == restored_fp
    assert len(source_fp) >= 9
    assert full_dump(cluster, source) == full_dump(cluster, restored)


def restore_and_compare(pg: LocalCluster, source_db: str, artifact, work_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Restore ``artifact`` into a new database and assert it equals ``source_db``."""
    restored = f"{source_db}_restored"
    admin = ConnectionInfo.parse(pg.dsn())
    create_database(admin, restored, artifact)
    try:
        restore_into(
            artifact,
            admin.with_dbname(restored),
            tools=find_tools(15),
            work_dir=work_dir,
            log=logging.getLogger("test"),
        )
        assert_same_database(pg, source_db, restored)
    finally:
        drop_database(admin, restored)
