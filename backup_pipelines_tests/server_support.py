"""A throwaway cluster with several small databases, for server targets (``databases: all``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.postgres import connect, content_fingerprint

# A non-superuser backup role: superusers bypass CONNECT privileges, the tests need a role
# that a REVOKE CONNECT really locks out.
BACKUP_ROLE = "backup_role"
BACKUP_ROLE_PASSWORD = "bk-" + "5e3f9a1c7d"


@contextmanager
def server_cluster(password: str) -> Iterator[LocalCluster]:
    with throwaway_cluster(password=password) as cluster:
        cluster.psql(
            f"CREATE ROLE {BACKUP_ROLE} LOGIN CREATEDB PASSWORD '{BACKUP_ROLE_PASSWORD}' "
            "IN ROLE pg_read_all_data"
        )
        yield cluster


def create_database(
    cluster: LocalCluster, name: str, rows: int = 50, owner: str = BACKUP_ROLE
) -> None:
    """A database with one table of ``rows`` rows, owned by ``owner`` (by default the backup
    role, so it can restore it too; an owner may always connect)."""
    cluster.psql(f'CREATE DATABASE "{name}" OWNER {owner}')
    cluster.psql(
        f"SET ROLE {owner}; CREATE TABLE item (id int PRIMARY KEY, label text); "
        f"INSERT INTO item SELECT g, '{name} item ' || g FROM generate_series(1, {rows}) g",
        dbname=name,
    )


def backup_role_dsn(cluster: LocalCluster, dbname: str = "postgres") -> str:
    return cluster.dsn(dbname, user=BACKUP_ROLE, password=BACKUP_ROLE_PASSWORD)


def fingerprint(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    with connect(ConnectionInfo.parse(cluster.dsn(dbname))) as conn:
        return content_fingerprint(conn)


def database_names(cluster: LocalCluster) -> set[str]:
    with psycopg.connect(cluster.dsn()) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
