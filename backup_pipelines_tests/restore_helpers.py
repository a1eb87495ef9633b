"""Helpers for restore tests: forged backups, database listings, connections held open."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import (
    BackupArtifact,
    backup_file_name,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.reader import dump_chunks


def databases(cluster: LocalCluster) -> set[str]:
    return set(cluster.psql("SELECT datname FROM pg_database").split())


def backup_files(folder: Path) -> list[Path]:
    """The backups and sidecars in a target's folder (lock files aside)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def connect_to(cluster: LocalCluster, dbname: str, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(ConnectionInfo.parse(cluster.dsn(dbname)).conninfo(), **kwargs)


def forge_plain_backup(
    artifact: BackupArtifact, transform: Callable[[bytes], bytes], *, suffix_seconds: int = 1
) -> Path:
    """Write a new, internally consistent plain+gzip backup whose SQL is ``transform(sql)``.

    Its checksum and .meta match, so only restoring it can reveal what ``transform`` did.
    """
    assert artifact.meta.format == "plain"
    dump = transform(b"".join(dump_chunks(artifact)))
    codec = zlib.compressobj(6, zlib.DEFLATED, 31)
    stored = codec.compress(dump) + codec.flush()
    taken = artifact.meta.started_at.replace(microsecond=0)
    from datetime import timedelta

    name = backup_file_name(
        artifact.meta.database, taken + timedelta(seconds=suffix_seconds), ".sql.gz"
    )
    path = artifact.path.with_name(name)
    digest = hashlib.sha256(stored).hexdigest()
    path.write_bytes(stored)
    path.chmod(0o600)
    path.with_name(name + ".sha256").write_text(sha256_line(digest, name))
    meta = artifact.meta.model_copy(
        update={
            "compression": "gzip",
            "file_name": name,
            "size_bytes": len(stored),
            "dump_bytes": len(dump),
            "sha256": digest,
            "started_at": artifact.meta.started_at + timedelta(seconds=suffix_seconds),
            "verification": None,
        }
    )
    write_meta(path.with_name(name + ".meta"), meta)
    return path


def inject_before_first(marker: bytes, statement: bytes) -> Callable[[bytes], bytes]:
    """A transform inserting ``statement`` before the first line containing ``marker``."""

    def transform(dump: bytes) -> bytes:
        start = dump.rindex(b"\n", 0, dump.index(marker)) + 1
        return dump[:start] + statement + dump[start:]

    return transform


@contextlib.contextmanager
def database_with(pg: LocalCluster, statements: str) -> Iterator[str]:
    """A fresh database holding ``statements`` (run as the superuser), dropped afterwards."""
    name = f"awkward_{secrets.token_hex(4)}"
    pg.psql(f'CREATE DATABASE "{name}"')
    try:
        pg.psql(statements, name)
        yield name
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def project_for(make_project, pg: LocalCluster, db: str, **settings: object):  # type: ignore[no-untyped-def]
    """A project whose one target ``prod`` backs up ``db`` of ``pg``, with ``settings``."""
    return make_project({"prod": {"dsn_env": "DB_PROD", **settings}}, env={"DB_PROD": pg.dsn(db)})
