"""Assertions shared by tests: compare databases the way a user would trust a restore."""

from __future__ import annotations

import os
import subprocess

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.postgres import ConnectionInfo, content_fingerprint


def full_dump(cluster: LocalCluster, dbname: str) -> str:
    """pg_dump's plain output without the per-run random \\restrict keys: equal text, equal database."""
    result = subprocess.run(
        [
            str(cluster.bin_dir / "pg_dump"),
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
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
