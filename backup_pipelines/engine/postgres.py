"""Talking to PostgreSQL: connections, client-tool discovery, what a dump contains, row counts.

Connection URLs are parsed, and handed to child processes, by ``engine/conninfo.py``; a
connection's errors here name only the password-free description (``user@host:port/db``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import DatabaseUnreachableError, ToolError

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

# psycopg is imported where a connection is made, not with this module: it costs a quarter of
# a second, and a backup starts pg_dump before it needs one (see engine/backup/pg_dump.py).


# Our sessions run without a statement or idle-in-transaction timeout, as pg_dump's do: one the
# database or role sets for applications would cut a row count, a catalog read or CREATE
# DATABASE short, or end the transaction that holds a backup's snapshot open. Nor do they
# inherit default_transaction_read_only (an archive database's protection against its
# applications), which refused a drill's CREATE DATABASE and amcheck's CREATE EXTENSION;
# transactions that must not write say READ ONLY themselves.
SESSION_SETTINGS = (
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("default_transaction_read_only", "off"),
)
_SESSION_SETUP_SQL = "SELECT " + ", ".join(
    f"set_config('{name}', '{value}', false)" for name, value in SESSION_SETTINGS
)


@contextmanager
def connect(info: ConnectionInfo, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    """Open a connection, turning libpq failures into an actionable error."""
    import psycopg

    try:
        conn = psycopg.connect(info.conninfo(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        detail = info.redact(str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        lowered = detail.lower()
        if "password authentication failed" in lowered or "no password supplied" in lowered:
            hint = "check the user and password in the connection URL (or ~/.pgpass)"
        elif "connect privilege" in lowered or "permission denied for database" in lowered:
            hint = (
                "grant the backup role CONNECT on that database (GRANT CONNECT ON DATABASE ... "
                "TO role), or add the database to the target's exclude: list"
            )
        elif "does not exist" in lowered:
            hint = "check the database name in the connection URL"
        else:
            hint = "check that the server is running and reachable from this host (host, port, firewall, pg_hba.conf)"
        raise DatabaseUnreachableError(
            f"cannot connect to {info.describe()}: {detail}", hint=hint
        ) from None
    try:
        conn.execute(_SESSION_SETUP_SQL)
        if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
            # A SQL_ASCII database stores bytes without an encoding, and psycopg returns its
            # text as bytes. LATIN1 (never converted from SQL_ASCII) maps each byte to one
            # character and back, so names read here are str and match the dump stream's
            # (read the same way, see python_encoding).
            conn.execute("SET client_encoding TO 'LATIN1'")
        if not autocommit:
            conn.commit()
        yield conn
    finally:
        conn.close()


def server_version_num(conn: psycopg.Connection) -> int:
    return conn.info.server_version


def server_major(version_num: int) -> int:
    return version_num // 10000


# --- client tools ---------------------------------------------------------------------------

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


# Installed with the server (Debian package postgresql-<ver>), the rest with the client
# (postgresql-client-<ver>).
_SERVER_PACKAGE_TOOLS = frozenset(
    {"postgres", "pg_ctl", "pg_controldata", "pg_waldump", "initdb", "pg_resetwal", "pg_checksums"}
)
# Programs that only work with their own major version: they run the server, or read its data
# directory, its WAL or a base backup's WAL (pg_verifybackup runs pg_waldump). Any other client
# tool may be newer than the server (pg_dump/pg_basebackup refuse only newer servers), but the
# server's own version is preferred: pg_dump 17 writes `SET transaction_timeout`, which a
# PostgreSQL 15 server rejects on restore.
EXACT_VERSION_TOOLS = _SERVER_PACKAGE_TOOLS | {"pg_verifybackup"}
# Where packages install one folder per major version: Debian/Ubuntu, then the PGDG RPMs.
BIN_ROOTS: tuple[str, ...] = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")


def debian_package(tool: str, major: int) -> str:
    """The Debian/Ubuntu package that installs ``tool`` of PostgreSQL ``major``."""
    return f"postgresql-{major}" if tool in _SERVER_PACKAGE_TOOLS else f"postgresql-client-{major}"


def installed_bin_dirs(patterns: tuple[str, ...] = BIN_ROOTS) -> list[tuple[int, Path]]:
    """``(major version, bin folder)`` of every installed PostgreSQL, oldest first."""
    found: dict[int, Path] = {}
    for pattern in patterns:
        for folder in sorted(Path("/").glob(pattern.lstrip("/"))):
            version = re.search(r"[/-](\d+)/bin$", str(folder))
            if version and folder.is_dir():
                found.setdefault(int(version.group(1)), folder)
    return sorted(found.items())


def choose_bin_dir(tool: str, server_major: int, installed: list[tuple[int, Path]]) -> Path:
    """The folder whose ``tool`` suits a server of ``server_major``: the server's own version;
    for tools that need not match exactly, else the lowest installed newer one."""
    having = [(version, folder) for version, folder in installed if (folder / tool).exists()]
    listed = ", ".join(str(version) for version, _ in having) or "none"
    for version, folder in having:
        if version == server_major:
            return folder
    package = debian_package(tool, server_major)
    if tool in EXACT_VERSION_TOOLS:
        raise ToolError(
            f"{tool} of PostgreSQL {server_major} is not installed (installed versions with "
            f"{tool}: {listed}); {tool} only works with its own major version",
            hint=f"install it (Debian/Ubuntu: apt-get install {package}), or set 'pg_bin_dir' "
            f"for this target to the folder holding PostgreSQL {server_major}'s programs",
        )
    newer = [(version, folder) for version, folder in having if version > server_major]
    if newer:
        return newer[0][1]
    newest = f"{having[-1][0]} ({having[-1][1] / tool})" if having else "none"
    raise ToolError(
        f"{tool} of PostgreSQL {server_major} or newer is not installed: the newest here is "
        f"{newest}, which is older than the server (PostgreSQL {server_major}); it cannot make "
        "a correct copy",
        hint=f"install {package} (or newer) and set 'pg_bin_dir' for this target if it is "
        "not under /usr/lib/postgresql",
    )


@dataclass(frozen=True)
class PgTools:
    """The PostgreSQL programs to use for one server: ``bin_dir`` (the configured folder, or
    the installed version chosen for the server; None: PATH), and for the programs that must
    match the server exactly, the folder of the server's own version."""

    bin_dir: Path | None
    server_major: int | None = None
    configured: bool = False
    installed: tuple[tuple[int, Path], ...] = ()

    def path(self, tool: str) -> str:
        if (
            tool in EXACT_VERSION_TOOLS
            and self.server_major is not None
            and not self.configured
            and self.installed
        ):
            return str(choose_bin_dir(tool, self.server_major, list(self.installed)) / tool)
        if self.bin_dir is not None:
            candidate = self.bin_dir / tool
            if candidate.exists():
                if tool in EXACT_VERSION_TOOLS and self.configured and self.server_major:
                    self._check_exact(tool, candidate)
                return str(candidate)
            raise ToolError(
                f"{tool} not found in {self.bin_dir}",
                hint="install the PostgreSQL client package or fix 'pg_bin_dir' in the targets file",
            )
        found = shutil.which(tool)
        if not found:
            raise ToolError(
                f"{tool} not found on PATH",
                hint="install the PostgreSQL client tools (Debian: apt-get install postgresql-client)",
            )
        return found

    def _check_exact(self, tool: str, candidate: Path) -> None:
        major = _tool_major(candidate)
        if major is not None and self.server_major is not None and major != self.server_major:
            raise ToolError(
                f"{candidate} is PostgreSQL {major}, the server is PostgreSQL "
                f"{self.server_major}: {tool} only works with its own major version",
                hint=f"point 'pg_bin_dir' at PostgreSQL {self.server_major}'s programs "
                f"(Debian/Ubuntu: apt-get install {debian_package(tool, self.server_major)})",
            )

    def major_version(self, tool: str = "pg_dump") -> int:
        major = _tool_major(Path(self.path(tool)))
        if major is None:
            raise ToolError(f"cannot read the version of {self.path(tool)}")
        return major

    def version_string(self, tool: str = "pg_dump") -> str:
        return _version_output(self.path(tool)).strip()


def _version_output(path: str) -> str:
    # Asked before and after every backup: run the tool once per installed binary (a package
    # upgrade changes the file's mtime, and with it the answer).
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = 0
    return _cached_version_output(path, stamp)


@functools.lru_cache(maxsize=64)
def _cached_version_output(path: str, stamp: int) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout


def _tool_major(program: Path) -> int | None:
    match = _VERSION_RE.search(_version_output(str(program)))
    return int(match.group(1)) if match else None


def find_tools(
    server_major_version: int | None,
    configured: Path | None = None,
    *,
    installed: list[tuple[int, Path]] | None = None,
) -> PgTools:
    """The PostgreSQL programs for a server of ``server_major_version`` (None: any server).

    ``configured`` (a target's ``pg_bin_dir``) is used as it is, checked against the server.
    Otherwise the server's own installed version, else the lowest installed newer one for
    client tools (pg_dump refuses servers newer than itself); programs that must match exactly
    (``EXACT_VERSION_TOOLS``) come only from the server's own version. Without a server version,
    the newest installed; with nothing installed in the usual places, PATH.
    """
    found = installed_bin_dirs() if installed is None else installed
    if configured is not None:
        tools = PgTools(configured, server_major_version, configured=True)
    elif server_major_version is None or not found:
        tools = PgTools(found[-1][1] if found else None, server_major_version)
    else:
        folder = choose_bin_dir("pg_dump", server_major_version, found)
        return PgTools(folder, server_major_version, installed=tuple(found))
    if server_major_version is not None:
        client_major = tools.major_version("pg_dump")
        if client_major < server_major_version:
            raise ToolError(
                f"pg_dump {client_major} ({tools.path('pg_dump')}) is older than the server "
                f"(PostgreSQL {server_major_version}); it cannot make a correct dump",
                hint=f"install postgresql-client-{server_major_version} or newer and set "
                "'pg_bin_dir' for this target",
            )
    return tools


# --- what a dump contains ---------------------------------------------------------------------

# Ordinary tables whose data pg_dump writes: user schemas, not temp, not owned by an extension.
TABLES_WITH_DATA_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND c.relpersistence IN ('p', 'u')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def _without_row_security(cur: psycopg.Cursor) -> None:
    # pg_dump turns row_security off: it dumps every row, or fails when a policy would hide
    # some. Counting and fingerprinting must see the same rows, or fail the same way, never
    # quietly count only what a policy shows this role.
    cur.execute("SELECT set_config('row_security', 'off', false)")


def tables_with_data(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """``(schema, table)`` of every table whose rows pg_dump writes (see TABLES_WITH_DATA_SQL)."""
    with conn.cursor() as cur:
        cur.execute(TABLES_WITH_DATA_SQL)
        return [(str(schema), str(table)) for schema, table in cur.fetchall()]


def _table(schema: str, table: str) -> sql.Composed:
    from psycopg import sql

    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def table_row_counts(
    conn: psycopg.Connection, *, lock_first: bool = False, with_children: bool = False
) -> dict[str, int]:
    """Exact row counts of every table with data, keyed ``schema.table``: each table's own rows
    (``ONLY``: an inheritance parent without its children's), exactly the rows the dump holds.
    ``with_children`` counts the way backups before ``row_counts_scope`` did (a parent with its
    inheritance children's rows), to check a restore of such a backup like with like.

    Partitioned tables hold no rows themselves and are not listed; their leaf partitions are.
    Row-level security is turned off for the session, as pg_dump does: a role a policy would
    hide rows from gets an error instead of a short count.

    ``lock_first`` takes ACCESS SHARE locks on every table before counting, like pg_dump does,
    so a schema change arriving mid-backup waits for the backup instead of changing a table
    under the count; how long the lock may be waited for is the session's ``lock_timeout``.
    """
    from psycopg import sql

    counts: dict[str, int] = {}
    tables = tables_with_data(conn)
    with conn.cursor() as cur:
        _without_row_security(cur)
        if lock_first and tables:
            cur.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                    sql.SQL(", ").join(sql.SQL("ONLY ") + _table(s, t) for s, t in tables)
                )
            )
        for schema, table in tables:
            only = sql.SQL("") if with_children else sql.SQL("ONLY ")
            cur.execute(sql.SQL("SELECT count(*) FROM {}{}").format(only, _table(schema, table)))
            row = cur.fetchone()
            counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


# Every large object with its owner, privileges, comment and content, in one value.
_LARGE_OBJECTS_SQL = """
SELECT count(*), md5(coalesce(string_agg(
    m.oid::text || ' ' || pg_get_userbyid(m.lomowner) || ' ' || coalesce(m.lomacl::text, '-')
    || ' ' || coalesce(obj_description(m.oid, 'pg_largeobject'), '-') || ' ' || md5(lo_get(m.oid)),
    E'\\n' ORDER BY m.oid), ''))
FROM pg_largeobject_metadata m
"""
LARGE_OBJECTS_KEY = "<large objects>"


def content_fingerprint(conn: psycopg.Connection) -> dict[str, str]:
    """An md5 of every table's own rows, in a stable order, and of the large objects (content,
    owner, privileges, comment): equal fingerprints, equal data. For tests and checks on
    modest databases: each table's rows are sorted on the server."""
    from psycopg import sql

    result: dict[str, str] = {}
    tables = tables_with_data(conn)
    with conn.cursor() as cur:
        _without_row_security(cur)
        for schema, table in tables:
            cur.execute(
                sql.SQL(
                    "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
                    "FROM ONLY {} t"
                ).format(_table(schema, table))
            )
            row = cur.fetchone()
            result[f"{schema}.{table}"] = str(row[0]) if row else ""
        cur.execute(_LARGE_OBJECTS_SQL)
        row = cur.fetchone()
        if row and row[0]:
            result[LARGE_OBJECTS_KEY] = f"{row[0]} objects, md5 {row[1]}"
    return result


# Sessions that hold, or queue for, an ACCESS EXCLUSIVE lock on a table of this database: the
# only lock mode that blocks the ACCESS SHARE locks pg_dump and the row count take on every
# table (a queued request blocks later ones too). Temporary tables are never dumped.
LOCK_BLOCKERS_SQL = """
SELECT l.pid, a.usename, a.application_name, host(a.client_addr), a.state, l.granted,
       CASE WHEN l.granted THEN a.xact_start ELSE l.waitstart END,
       coalesce(quote_ident(n.nspname) || '.' || quote_ident(c.relname), l.relation::text),
       l.virtualtransaction,
       CASE WHEN l.granted THEN '{}'::int[] ELSE pg_blocking_pids(l.pid) END
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.locktype = 'relation'
  AND l.mode = 'AccessExclusiveLock'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid IS DISTINCT FROM pg_backend_pid()
  AND coalesce(c.relpersistence, 'p') <> 't'
ORDER BY l.granted DESC, 7, l.pid
"""

SESSIONS_SQL = """
SELECT pid, usename, application_name, host(client_addr), state, xact_start
FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid
"""


def _describe_session(
    pid: int | None,
    user: str | None,
    application: str | None,
    client: str | None,
    state: str | None,
    since: Any,
    since_what: str,
) -> str:
    parts = [f"user '{user}'" if user else "user unknown"]
    parts.append(f"application '{application}'" if application else "no application_name")
    if client:
        parts.append(f"from {client}")
    if since is not None:
        parts.append(f"{since_what} {since.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    if state:
        parts.append(state)
    return f"pid {pid} ({', '.join(parts)})"


def lock_blockers(conn: psycopg.Connection) -> list[tuple[int | None, str]]:
    """``(pid, description)`` of each session that blocks ACCESS SHARE locks on this
    database's tables: who (pid, user, application, client), since when, which table, and, for
    a request still queued, the sessions it waits behind. Needs no privilege beyond connecting."""
    rows = conn.execute(LOCK_BLOCKERS_SQL).fetchall()
    lines: list[tuple[int | None, str]] = []
    for pid, user, app, client, state, granted, since, relation, vxid, blocked_by in rows:
        if pid is None:
            lines.append(
                (
                    None,
                    f"a prepared transaction (virtual transaction {vxid}) holding an ACCESS "
                    f"EXCLUSIVE lock on {relation}; see pg_prepared_xacts (COMMIT PREPARED or "
                    "ROLLBACK PREPARED)",
                )
            )
            continue
        if granted:
            who = _describe_session(pid, user, app, client, state, since, "in a transaction since")
            lines.append((pid, f"{who} holding an ACCESS EXCLUSIVE lock on {relation}"))
            continue
        who = _describe_session(pid, user, app, client, state, since, "waiting since")
        line = f"{who} queued for an ACCESS EXCLUSIVE lock on {relation}"
        if blocked_by:
            ahead = [
                _describe_session(
                    pid_, user_, app_, client_, state_, since_, "in a transaction since"
                )
                for pid_, user_, app_, client_, state_, since_ in conn.execute(
                    SESSIONS_SQL, (list(blocked_by),)
                ).fetchall()
            ]
            line += " behind " + "; ".join(ahead or [f"pid(s) {list(blocked_by)}"])
        lines.append((pid, line))
    return lines
