"""Helpers for migration tests: databases built the way drizzle-orm migrates them, and dumps.

The fixture history (``fixtures/drizzle``) is a realistic drizzle-kit folder: enum types, tables,
foreign keys, indexes (partial and expression), an enum value added later, and data changes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.migrations.journal import (
    MigrationsFolder,
    TrackingTable,
    apply_migrations,
)
from backup_pipelines_tests.helpers import full_dump

FIXTURE_HISTORY = Path(__file__).parent / "fixtures" / "drizzle"
HISTORY_LENGTH = 6
DRIZZLE_DEFAULT_TABLE = TrackingTable()

_names = itertools.count(1)


def conninfo(cluster: LocalCluster, dbname: str) -> str:
    return ConnectionInfo.parse(cluster.dsn(dbname)).conninfo()


def create_database(cluster: LocalCluster, prefix: str = "app") -> str:
    name = f"{prefix}_{os.getpid()}_{next(_names)}"
    cluster.psql(f'CREATE DATABASE "{name}"')
    return name


def drop_database(cluster: LocalCluster, name: str) -> None:
    with contextlib.suppress(Exception):
        cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(cluster: LocalCluster, prefix: str = "app") -> Iterator[str]:
    name = create_database(cluster, prefix)
    try:
        yield name
    finally:
        drop_database(cluster, name)


def migrate(
    cluster: LocalCluster,
    dbname: str,
    folder: Path = FIXTURE_HISTORY,
    upto: int | None = None,
    table: TrackingTable = DRIZZLE_DEFAULT_TABLE,
) -> list[str]:
    """Apply pending migrations the way drizzle-orm's migrate() does (one transaction)."""
    with psycopg.connect(conninfo(cluster, dbname)) as conn:
        return apply_migrations(conn, MigrationsFolder.load(folder), table, upto=upto)


def copy_history(destination: Path, source: Path = FIXTURE_HISTORY) -> Path:
    shutil.copytree(source, destination)
    return destination


def schema_dump(cluster: LocalCluster, dbname: str) -> str:
    """``pg_dump --schema-only`` without pg_dump's per-run random ``\\restrict`` keys."""
    return full_dump(cluster, dbname, "--schema-only")


def tracking_rows(
    cluster: LocalCluster, dbname: str, table: TrackingTable = DRIZZLE_DEFAULT_TABLE
) -> list[tuple[int, str, int]]:
    with psycopg.connect(conninfo(cluster, dbname)) as conn:
        return [
            (int(i), str(h), int(c))
            for i, h, c in conn.execute(
                f'SELECT id, hash, created_at FROM "{table.schema}"."{table.name}" ORDER BY id'
            )
        ]


def query(cluster: LocalCluster, dbname: str, statement: str) -> list[tuple]:
    with psycopg.connect(conninfo(cluster, dbname)) as conn:
        return list(conn.execute(statement))


APP_DATA_SQL = """
INSERT INTO employees (full_name, email, department_id, phone, hourly_rate) VALUES
  ('Zoë Åkesson', 'zoe@example.com', 1, '+46 70 123 45 67', 21.50),
  ('Jamal Ortiz', 'jamal@example.com', 2, NULL, 18.00),
  ('Mei Chen', 'mei@example.com', 3, '+1 555 0100', 19.25);
INSERT INTO shifts (employee_id, starts_at, ends_at, status)
SELECT 1 + (n % 3),
       timestamptz '2024-11-01 08:00+00' + n * interval '1 day',
       timestamptz '2024-11-01 16:00+00' + n * interval '1 day',
       (ARRAY['scheduled', 'completed', 'cancelled', 'no_show']::shift_status[])[1 + n % 4]
FROM generate_series(1, 40) AS n;
INSERT INTO shift_swaps (shift_id, requested_by, taken_by, state, note)
SELECT id, employee_id, 1 + employee_id % 3, 'requested', 'family event'
FROM shifts WHERE status = 'scheduled' LIMIT 5;
"""


def realistic_database(cluster: LocalCluster, dbname: str, folder: Path = FIXTURE_HISTORY) -> None:
    """Migrate to 0004, add application data, then apply 0005 (which moves data) like a deploy."""
    migrate(cluster, dbname, folder, upto=5)
    with psycopg.connect(conninfo(cluster, dbname)) as conn:
        conn.execute(APP_DATA_SQL)
    migrate(cluster, dbname, folder)


@contextlib.contextmanager
def realistic_app_database(cluster: LocalCluster) -> Iterator[str]:
    """A fresh database with the whole fixture history applied and application data in it."""
    with database(cluster) as name:
        realistic_database(cluster, name)
        yield name


def app_project(
    make_project,
    cluster: LocalCluster,
    dbname: str,
    dsn_env: str,
    folder: Path = FIXTURE_HISTORY,
    **migrations,
):  # type: ignore[no-untyped-def]
    """A targets file with one target ``app`` whose migrations live in ``folder``."""
    return make_project(
        {"app": {"dsn_env": dsn_env, "migrations": {"folder": str(folder), **migrations}}},
        env={dsn_env: cluster.dsn(dbname)},
    )


def history_dumps(cluster: LocalCluster, folder: Path = FIXTURE_HISTORY) -> list[str]:
    """Schema dumps of a database migrated to each point in history: index K = first K applied."""
    count = len(MigrationsFolder.load(folder).migrations)
    dumps = []
    with database(cluster, "history") as name:
        for upto in range(count + 1):
            migrate(cluster, name, folder, upto=upto)
            dumps.append(schema_dump(cluster, name))
    return dumps
