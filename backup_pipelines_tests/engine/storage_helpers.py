"""Backup triples written without PostgreSQL, for storage, offsite and retention tests.

The data is a real gzip of a plain-SQL-looking payload, with a correct ``.sha256`` and ``.meta``,
so verification code treats it like any backup; only the database step is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from backup_pipelines.engine.artifacts import (
    BackupArtifact,
    BackupMeta,
    backup_file_name,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.fsutil import ensure_private_dir, write_atomic
from backup_pipelines.engine.version import TOOL_VERSION


def fake_backup(
    folder: Path,
    database: str,
    *,
    started_at: datetime | None = None,
    payload: bytes = b"SELECT 1;\n",
    verified: bool | None = True,
    purpose: str = "scheduled",
    target: str = "prod",
) -> BackupArtifact:
    ensure_private_dir(folder)
    started = started_at or datetime.now(UTC)
    sql = payload + b"\n-- PostgreSQL database dump complete\n"
    data = gzip.compress(sql, mtime=0)
    path = folder / backup_file_name(database, started, ".sql.gz")
    write_atomic(path, data)
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path.with_name(path.name + ".sha256"), sha256_line(digest, path.name).encode())
    verification = (
        None
        if verified is None
        else {"passed": verified, "checks": {"checksum": {"passed": verified, "message": "test"}}}
    )
    meta = BackupMeta(
        tool_version=TOOL_VERSION,
        purpose=purpose,
        target=target,
        database=database,
        server="test",
        server_version="15",
        server_version_num=150000,
        pg_dump_version="15",
        format="plain",
        compression="gzip",
        compression_level=6,
        file_name=path.name,
        size_bytes=len(data),
        dump_bytes=len(sql),
        sha256=digest,
        started_at=started,
        finished_at=started,
        duration_seconds=0.0,
        verification=verification,
    )
    write_meta(path.with_name(path.name + ".meta"), meta)
    return BackupArtifact(path, meta)
