"""The databases of a restore: create and drop them, label the ones we create, copy the live
database's owner, privileges and settings, terminate sessions, and swap two databases by
renaming both in one transaction."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.globals import (
    apply_database_properties,
    read_database_properties,
)
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import RestoreFailedError
from backup_pipelines.engine.postgres import PgTools, connect, find_tools, server_major

PREVIOUS_COPY_MARKER = "backup_pipelines:pre_restore"
SESSION_EXIT_TIMEOUT_SECONDS = 30.0


RESTORING_MARKER = "backup_pipelines:restoring"
SCRATCH_MARKER = "backup_pipelines:scratch"


def scratch_name(prefix: str, target: str) -> str:
    return f"{prefix}_{target}_{int(time.time())}_{secrets.token_hex(3)}"[:63]


def create_database(
    admin: ConnectionInfo, name: str, artifact: BackupArtifact | None = None
) -> None:
    """CREATE DATABASE from template0 with the source's encoding and locale when known."""
    options: sql.Composable = sql.SQL("")
    meta = artifact.meta if artifact else None
    if meta is not None and meta.database_encoding:
        options = sql.SQL(" ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(meta.database_encoding),
            sql.Literal(meta.database_collate),
            sql.Literal(meta.database_ctype),
        )
    with connect(admin, autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
                + options
            )
        except Exception as exc:
            if not options.as_string(conn):
                raise
            # The drill server may lack the source's locale: fall back to its defaults.
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
            del exc


def subscriptions_of(
    conn: psycopg.Connection, database: str, *, enabled: bool = False
) -> list[str]:
    """The logical-replication subscriptions of ``database`` (``enabled``: only those enabled)."""
    rows = conn.execute(
        "SELECT s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        "WHERE d.datname = %s AND (s.subenabled OR NOT %s) ORDER BY 1",
        (database, enabled),
    ).fetchall()
    return [row[0] for row in rows]


def replication_slots_of(conn: psycopg.Connection, database: str) -> list[str]:
    """The replication slots made in ``database`` (logical slots belong to one database)."""
    rows = conn.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s ORDER BY 1", (database,)
    ).fetchall()
    return [row[0] for row in rows]


def disable_subscriptions(
    admin: ConnectionInfo, database: str, names: list[str], *, drop: bool = False
) -> None:
    """Disable the subscriptions ``names`` of ``database``; ``drop``: also unlink each from its
    replication slot (``slot_name = NONE``) and drop it. A subscription dropped while it still
    names its slot would connect to the publisher and drop that slot, which belongs to the
    source database's subscription: the publisher is never contacted this way."""
    with connect(admin.with_dbname(database), autocommit=True) as conn:
        for name in names:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
            if drop:
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def drop_database(admin: ConnectionInfo, name: str, *, force: bool = True) -> None:
    """DROP DATABASE (``force``: ending its sessions), after dropping its subscriptions.

    PostgreSQL refuses to drop a database that has a logical-replication subscription, and a
    restored copy has the source's (pg_dump restores them disabled, not connected); they are
    dropped without touching the publisher (see :func:`disable_subscriptions`).
    """
    with connect(admin, autocommit=True) as conn:
        subscriptions = subscriptions_of(conn, name)
    if subscriptions:
        disable_subscriptions(admin, name, subscriptions, drop=True)
    statement = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if force else "DROP DATABASE IF EXISTS {}"
    with connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


def server_tools(admin: ConnectionInfo, target: Target) -> PgTools:
    with connect(admin) as conn:
        major = server_major(conn.info.server_version)
    return find_tools(major, target.settings.pg_bin_dir)


def maintenance_connection(target: Target) -> ConnectionInfo:
    live = ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )
    return live.with_dbname(target.settings.restore.maintenance_database)


def utc_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d_%H%M%S")


def free_name(conn: psycopg.Connection, base: str, suffix: str) -> str:
    """``<base>_<suffix>`` cut to PostgreSQL's 63 bytes, made unique on this server."""
    for attempt in range(100):
        extra = f"_{attempt}" if attempt else ""
        tail = f"_{suffix}{extra}"
        head = base.encode()[: 63 - len(tail.encode())].decode("utf-8", "ignore")
        name = head + tail
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if row is None:
            return name
    raise RestoreFailedError(f"no free database name for {base}_{suffix}")


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
    )


def copy_database_properties(conn: psycopg.Connection, source: str, dest: str) -> None:
    """Give the restored database the live one's owner, privileges and settings.

    pg_dump without --create leaves database-level properties out of the dump; without this
    the application role could lose CONNECT or its per-database settings after the swap.
    """
    apply_database_properties(conn, dest, read_database_properties(conn, source))


def terminate_sessions(conn: psycopg.Connection, database: str, *, log: Any) -> int:
    """Terminate every other session on ``database`` and wait until they are gone."""
    terminated = 0
    deadline = time.monotonic() + SESSION_EXIT_TIMEOUT_SECONDS
    while True:
        rows = conn.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
        if not rows:
            break
        terminated += sum(1 for _, ok in rows if ok)
        if time.monotonic() > deadline:
            raise RestoreFailedError(
                f"{len(rows)} session(s) on {database} did not end within "
                f"{SESSION_EXIT_TIMEOUT_SECONDS:.0f}s",
            )
        time.sleep(0.1)
    if terminated:
        log.info(f"Terminated {terminated} session(s) connected to {database}")
    return terminated


def swap_databases(
    conn: psycopg.Connection, live: str, restored: str, previous: str, target: Target, *, log: Any
) -> int:
    """Put ``restored`` in place of ``live``; ``live`` becomes ``previous``. All or nothing."""
    row = conn.execute(
        "SELECT datallowconn, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname = %s",
        (live,),
    ).fetchone()
    allowed = bool(row[0]) if row else True
    live_comment = row[1] if row else None
    live_ident = sql.Identifier(live)
    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(live_ident))
    try:
        terminated = terminate_sessions(conn, live, log=log)
        marker = json.dumps(
            {
                "marker": PREVIOUS_COPY_MARKER,
                "target": target.name,
                "database": live,
                "replaced_at": datetime.now(UTC).isoformat(),
            }
        )
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    live_ident, sql.Identifier(previous)
                )
            )
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(restored), live_ident
                )
            )
            # The restored database loses its "restoring" label and takes over the comment
            # the live one had (pg_dump without --create does not carry it).
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    live_ident, sql.Literal(live_comment)
                )
            )
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(previous), sql.Literal(marker)
                )
            )
    except BaseException:
        # The renames rolled back together: only the connection block needs undoing.
        with contextlib.suppress(Exception):
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    live_ident, sql.SQL("true" if allowed else "false")
                )
            )
        raise
    if allowed:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(previous))
        )
    return terminated


def mark_database(admin: ConnectionInfo, name: str, marker: str, target: Target) -> None:
    """Label a database we created, so a later run can recognise it if this one dies."""
    label = json.dumps(
        {
            "marker": marker,
            "target": target.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created_at": datetime.now(UTC).isoformat(),
        }
    )
    with connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(label))
        )
