"""Assertions shared by tests: compare databases the way a user would trust a restore."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.postgres import connect, content_fingerprint, find_tools
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
        # A SQL_ASCII database's dump holds bytes in no encoding: compared as they are.
        errors="surrogateescape",
        check=True,
        env={**os.environ, "PGPASSWORD": cluster.password or ""},
    )
    return "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def fingerprint(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    with connect(ConnectionInfo.parse(cluster.dsn(dbname))) as conn:
        return content_fingerprint(conn)


def assert_same_database(
    cluster: LocalCluster, source: str, restored: str, *, at_least: int = 9
) -> None:
    """Equal rows and large objects, and equal pg_dump output; at least ``at_least`` tables
    (large objects count as one) compared, so that an empty comparison never passes."""
    source_fp, restored_fp = fingerprint(cluster, source), fingerprint(cluster, restored)
    assert source_fp == restored_fp
    assert len(source_fp) >= at_least
    assert full_dump(cluster, source) == full_dump(cluster, restored)


def restore_and_compare(  # type: ignore[no-untyped-def]
    pg: LocalCluster, source_db: str, artifact, work_dir: Path, *, at_least: int = 9
) -> None:
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
        assert_same_database(pg, source_db, restored, at_least=at_least)
    finally:
        drop_database(admin, restored)
