"""The server's globals in every logical backup set: roles, memberships, role settings and
tablespaces (``pg_dumpall --globals-only``), plus the database's own owner, privileges and
settings, which neither pg_dump (without --create) nor pg_dumpall --globals-only carries.

They live outside every database, so a dump alone cannot be restored onto a new server with its
ownership and grants intact. The globals file is written beside the dump as
``<data file>.globals[.gz|.zst][.gpg]`` with the same compression and encryption, its own
``.sha256`` sidecar and an entry in the dump's ``.meta`` (``globals``). It gets its final name
*before* the data file does, so until the data file's rename (the commit point of the whole set)
it is a leftover like any sidecar without its data file; a failed backup removes it.

Role password hashes are read from ``pg_authid``, which only superusers may read. A backup role
without that right gets the roles without their passwords (``--no-role-passwords``); ``.meta``
says so (``globals.role_passwords: false`` and the reason) and the backup does not fail. The
file holds password hashes otherwise: it is 0600, encrypted like the dump, and its content is
never logged.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.artifacts import (
    GLOBALS_MARKER,
    SHA256_SUFFIX,
    BackupArtifact,
    DatabaseGrant,
    DatabaseProperties,
    DatabaseSetting,
    GlobalsEntry,
    sha256_line,
)
from backup_pipelines.engine.backup.files import HashingSink, discard_failed_backup
from backup_pipelines.engine.compression import (
    CHUNK_SIZE,
    compressor,
    decompress_chunks,
    read_chunks,
)
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.encryption import decrypt_chunks
from backup_pipelines.engine.errors import BackupFailedError, IntegrityError
from backup_pipelines.engine.fsutil import open_private, partial_path, write_atomic
from backup_pipelines.engine.postgres import PgTools, connect
from backup_pipelines.engine.processes import one_line, spawn, stop

if TYPE_CHECKING:
    import psycopg

# psycopg is imported when a connection is made: this module is loaded before pg_dump starts.

# pg_dumpall's last line: a globals file without it was cut short.
GLOBALS_TRAILER = b"-- PostgreSQL database cluster dump complete"
# Globals are small (a few KiB per role); more than this is not a globals file.
MAX_GLOBALS_SQL_BYTES = 256 << 20
_SUFFIXES = {"gzip": ".gz", "zstd": ".zst", "none": ""}
_NO_AUTHID = "permission denied for table pg_authid"


def globals_file_name(data_name: str, compression: str, *, encrypted: bool) -> str:
    """``<data file>.globals`` + the compression's suffix + ``.gpg`` when encrypted."""
    return data_name + GLOBALS_MARKER + _SUFFIXES[compression] + (".gpg" if encrypted else "")


# --- the database's own properties -----------------------------------------------------------


def read_database_properties(conn: psycopg.Connection, database: str) -> DatabaseProperties:
    """Owner, explicit privileges and settings (``ALTER [ROLE r IN] DATABASE d SET``) of
    ``database``, read from the shared catalogs (any role may read them)."""
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba), datacl IS NULL FROM pg_database WHERE datname = %s",
        (database,),
    ).fetchone()
    if row is None:
        raise BackupFailedError(f"database '{database}' is not on the server")
    owner, default_acl = row
    grants = []
    if not default_acl:
        grants = [
            DatabaseGrant(grantee=grantee, privilege=privilege, grantable=grantable)
            for grantee, privilege, grantable in conn.execute(
                "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
                "a.privilege_type, a.is_grantable FROM pg_database d, aclexplode(d.datacl) a "
                "WHERE d.datname = %s ORDER BY 1 NULLS FIRST, 2",
                (database,),
            ).fetchall()
        ]
    settings = [
        DatabaseSetting(role=role, setting=item)
        for role, config in conn.execute(
            "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, "
            "s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = %s ORDER BY 1 NULLS FIRST",
            (database,),
        ).fetchall()
        for item in config or []
    ]
    return DatabaseProperties(
        owner=owner, default_acl=bool(default_acl), grants=grants, settings=settings
    )


def apply_database_properties(
    conn: psycopg.Connection, database: str, properties: DatabaseProperties
) -> None:
    """Give ``database`` the owner, privileges and settings of ``properties``."""
    from psycopg import sql

    ident = sql.Identifier(database)
    conn.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(properties.owner))
    )
    if not properties.default_acl:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        for grant in properties.grants:
            conn.execute(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(grant.privilege),
                    ident,
                    sql.Identifier(grant.grantee) if grant.grantee else sql.SQL("PUBLIC"),
                    sql.SQL(" WITH GRANT OPTION") if grant.grantable else sql.SQL(""),
                )
            )
    for setting in properties.settings:
        key, _, value = setting.setting.partition("=")
        conn.execute(
            sql.SQL("ALTER {} DATABASE {} SET {} = {}").format(
                sql.SQL("ROLE {} IN").format(sql.Identifier(setting.role))
                if setting.role
                else sql.SQL(""),
                ident,
                sql.Identifier(key),
                sql.Literal(value),
            )
        )


# --- capturing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedGlobals:
    """A globals file written as ``.partial`` beside a backup that is not committed yet."""

    entry: GlobalsEntry
    final: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file this globals capture may leave: removed when the backup fails."""
        return (partial_path(self.final), self.final, self.sidecar)

    @property
    def sidecar(self) -> Path:
        return self.final.with_name(self.final.name + SHA256_SUFFIX)

    def commit(self) -> None:
        """Give the globals file its final name, just before the data file gets its own (the
        commit point of the set): a backup killed while dumping leaves only ``.partial`` files."""
        write_atomic(self.sidecar, sha256_line(self.entry.sha256, self.final.name).encode())
        os.replace(partial_path(self.final), self.final)

    def discard(self) -> None:
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _may_read_passwords(info: ConnectionInfo) -> tuple[str, bool]:
    with connect(info, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_user, has_table_privilege('pg_catalog.pg_authid', 'SELECT')"
        ).fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


def _no_passwords_reason(user: str) -> str:
    return (
        f"the backup role '{user}' may not read pg_authid (it is not a superuser), so the roles "
        "were captured without their passwords (pg_dumpall --no-role-passwords): after a restore "
        "onto a new server set them with ALTER ROLE ... PASSWORD, or back up as a superuser"
    )


def capture_globals(
    target: Target,
    info: ConnectionInfo,
    tools: PgTools,
    data_path: Path,
    *,
    stage_factory: Any,
    log: Any,
) -> CapturedGlobals:
    """Write the server's globals beside ``data_path`` (which does not exist yet) and return
    their ``.meta`` entry. Raises BackupFailedError, leaving no file, when that fails."""
    settings = target.settings
    name = globals_file_name(
        data_path.name, settings.compression, encrypted=stage_factory is not None
    )
    final = data_path.with_name(name)
    captured = CapturedGlobals(
        GlobalsEntry(file_name=name, size_bytes=0, sha256="", sql_bytes=0, compression=""), final
    )
    try:
        user, passwords = _may_read_passwords(info)
        with connect(info, autocommit=True) as conn:
            database = read_database_properties(conn, info.dbname)
        reason = None if passwords else _no_passwords_reason(user)
        try:
            entry = _write_globals(target, info, tools, final, stage_factory, passwords)
        except _NoAuthid:
            # has_table_privilege said yes, pg_dumpall was refused anyway (e.g. a policy):
            # the roles without their passwords are still worth having.
            passwords, reason = False, _no_passwords_reason(user)
            entry = _write_globals(target, info, tools, final, stage_factory, passwords)
        if reason:
            log.warning(f"Globals of target '{target.name}': {reason}")
        entry = entry.model_copy(
            update={
                "role_passwords": passwords,
                "role_passwords_reason": reason,
                "database": database,
            }
        )
    except BaseException as exc:
        import psycopg

        if isinstance(exc, psycopg.Error):
            exc = BackupFailedError(
                f"capturing the server's globals for target '{target.name}' failed: "
                f"{info.redact(str(exc).strip())}; nothing of this backup was kept"
            )
        # Removes what was written; a full disk becomes the same actionable error as for a dump.
        raise discard_failed_backup(
            exc,
            what=f"the globals file of the backup of '{target.name}'",
            folder=final.parent,
            proc=None,
            aborts=[],
            leftovers=list(captured.paths),
        ) from None
    log.info(
        f"Globals captured: {name} ({entry.roles} roles, role passwords "
        f"{'included' if entry.role_passwords else 'NOT included'}, {entry.size_bytes} bytes)"
    )
    return CapturedGlobals(entry, final)


class _NoAuthid(Exception):
    """pg_dumpall was refused reading pg_authid."""


def _write_globals(
    target: Target,
    info: ConnectionInfo,
    tools: PgTools,
    final: Path,
    stage_factory: Any,
    passwords: bool,
) -> GlobalsEntry:
    settings = target.settings
    tmp = partial_path(final)
    argv = [tools.path("pg_dumpall"), "--no-password", "--globals-only", info.dbname_option()]
    if not passwords:
        argv.append("--no-role-passwords")
    proc: subprocess.Popen[bytes] | None = None
    abort: Callable[[], object] | None = None
    try:
        with open_private(tmp) as handle:
            sink = HashingSink(handle)
            if stage_factory is not None:
                write, finish, encryption, *cleanup = stage_factory(sink)
                abort = cleanup[0] if cleanup else None
            else:
                write, finish, encryption = sink.write, (lambda: None), {"mode": "none"}
            codec = compressor(settings.compression, settings.effective_compression_level)
            proc, stderr = spawn(argv, env=info.child_env(), stdout=subprocess.PIPE)
            assert proc.stdout is not None
            sql_bytes, roles, tail, carry = 0, 0, b"", b""
            for chunk in read_chunks(proc.stdout, CHUNK_SIZE):
                sql_bytes += len(chunk)
                tail = (tail + chunk)[-4096:]
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                roles += sum(1 for line in lines if line.startswith(b"CREATE ROLE "))
                write(codec.compress(chunk))
            write(codec.flush())
            returncode = proc.wait()
            if returncode != 0:
                text = stderr.text()
                if _NO_AUTHID in text and passwords:
                    raise _NoAuthid()
                raise BackupFailedError(
                    f"pg_dumpall --globals-only failed for target '{target.name}' "
                    f"({info.describe()}): {one_line(info.redact(text)) or f'exit {returncode}'}; "
                    "nothing of this backup was kept",
                    hint="the backup role must be able to connect to the database and read "
                    "the shared catalogs (pg_roles, pg_auth_members, pg_tablespace)",
                )
            if GLOBALS_TRAILER not in tail:
                raise BackupFailedError(
                    f"pg_dumpall --globals-only for target '{target.name}' ended without its "
                    "'dump complete' trailer; nothing of this backup was kept"
                )
            finish()
            sink.commit()
    except BaseException:
        if proc is not None:
            stop(proc)
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return GlobalsEntry(
        file_name=final.name,
        size_bytes=sink.size,
        sha256=sink.digest.hexdigest(),
        sql_bytes=sql_bytes,
        compression=settings.compression,
        encryption=encryption,
        pg_dumpall_version=tools.version_string("pg_dumpall"),
        roles=roles,
    )


# --- reading back ------------------------------------------------------------------------------


def globals_sql_chunks(artifact: BackupArtifact) -> Iterator[bytes]:
    """The globals SQL exactly as pg_dumpall wrote it (decrypted, decompressed)."""
    entry = artifact.meta.globals
    assert entry is not None
    stored = artifact.globals_stored_chunks()
    if entry.encryption.get("mode", "none") != "none":
        stored = decrypt_chunks(
            entry.encryption, stored, name=entry.file_name, target=artifact.meta.target
        )
    yield from decompress_chunks(entry.compression, stored, name=entry.file_name)


def read_globals_sql(artifact: BackupArtifact) -> str:
    """The whole globals SQL (small: a few KiB per role); raises IntegrityError when it is cut
    short or larger than any globals file."""
    entry = artifact.meta.globals
    assert entry is not None
    parts: list[bytes] = []
    size = 0
    for chunk in globals_sql_chunks(artifact):
        size += len(chunk)
        if size > MAX_GLOBALS_SQL_BYTES:
            raise IntegrityError(f"globals file {entry.file_name} decodes to more than 256 MiB")
        parts.append(chunk)
    data = b"".join(parts)
    if GLOBALS_TRAILER not in data[-4096:]:
        raise IntegrityError(
            f"globals file {entry.file_name} ends without pg_dumpall's 'dump complete' trailer: "
            "it is incomplete"
        )
    return data.decode("utf-8")
