"""Talking to pg_dump and the source database: the snapshot a dump runs in, pg_dump's
arguments, what its failures mean (with the blocking session named when it waited for a lock),
and exact row counts by ``count(*)`` in the dump's snapshot where the stream cannot give them.

Nothing here imports psycopg before pg_dump runs: the snapshot is exported by ``psql``, which
is connected in 30 ms where importing psycopg alone takes a quarter of a second; our own
connection joins the snapshot while pg_dump is already dumping.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupFailedError, BackupPipelinesError
from backup_pipelines.engine.postgres import (
    SESSION_SETTINGS,
    PgTools,
    connect,
    lock_blockers,
    table_row_counts,
    tables_with_data,
)
from backup_pipelines.engine.processes import one_line, spawn, stop

if TYPE_CHECKING:
    import psycopg

# The psql session holding the snapshot is set up as our own sessions are (SESSION_SETTINGS):
# an idle-in-transaction timeout would end it, and the snapshot with it.
_EXPORT_SQL = (
    (
        "\\set ON_ERROR_STOP on\n"
        + "".join(f"SET {name} = {value};\n" for name, value in SESSION_SETTINGS)
    ).encode()
    + b"""BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
SELECT json_build_object('snapshot', pg_export_snapshot(),
  'version', current_setting('server_version'),
  'version_num', current_setting('server_version_num')::int,
  'encoding', pg_encoding_to_char(d.encoding), 'collate', d.datcollate, 'ctype', d.datctype)
FROM pg_database d WHERE d.datname = current_database();
"""
)


@dataclass(frozen=True)
class ExportedSnapshot:
    """The snapshot a backup runs in and what the dump needs to know of the database."""

    snapshot: str
    server_version: str
    server_version_num: int
    encoding: str
    collate: str
    ctype: str


@contextmanager
def exported_snapshot(info: ConnectionInfo, psql: str | Path) -> Iterator[ExportedSnapshot]:
    """Export a snapshot from a repeatable-read transaction that ``psql`` holds open until the
    block ends: pg_dump, its parallel workers, the counting scan and our own connection
    (:func:`tables_in_snapshot`) import it while it lives.

    If psql cannot connect, the error is the same one a connection of ours would give."""
    proc, stderr = spawn(
        [str(psql), "-X", "-q", "-A", "-t", "--no-password", info.dbname_option()],
        env=info.child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            proc.stdin.write(_EXPORT_SQL)
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # psql has ended: its reason is on stderr
        line = proc.stdout.readline()
        try:
            row: dict[str, Any] = json.loads(line)
            exported = ExportedSnapshot(
                snapshot=str(row["snapshot"]),
                server_version=str(row["version"]),
                server_version_num=int(row["version_num"]),
                encoding=str(row["encoding"]),
                collate=str(row["collate"]),
                ctype=str(row["ctype"]),
            )
        except (ValueError, KeyError, TypeError):
            proc.wait()
            with connect(info):  # the actionable error when the database cannot be reached
                pass
            raise BackupFailedError(
                f"psql could not export a snapshot of {info.describe()}: "
                f"{one_line(info.redact(stderr.text())) or f'exit status {proc.returncode}'}",
                hint="the backup role must be able to connect and run a repeatable-read "
                "transaction (a standby needs hot_standby on)",
            ) from None
        yield exported
    finally:
        # End of input: psql disconnects and the transaction ends with it.
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop(proc)
        proc.stdout.close()


@contextmanager
def connection_in_snapshot(info: ConnectionInfo, snapshot: str) -> Iterator[psycopg.Connection]:
    """A connection of our own inside the dump's snapshot (repeatable read, read-only), made
    beside pg_dump while :func:`exported_snapshot` holds the snapshot open."""
    from psycopg import sql

    with connect(info) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        yield conn


def tables_in_snapshot(info: ConnectionInfo, snapshot: str) -> list[tuple[str, str]]:
    """The tables whose rows the dump holds (``tables_with_data``), read in its snapshot."""
    with connection_in_snapshot(info, snapshot) as conn:
        return tables_with_data(conn)


@dataclass(frozen=True)
class DumpSource:
    """One database as the dump sees it: its snapshot (held open by :func:`exported_snapshot`),
    the programs for its server version and its encoding."""

    info: ConnectionInfo
    tools: PgTools
    server_version: str
    server_version_num: int
    snapshot: str
    encoding: str
    collate: str
    ctype: str


def lock_wait_ms(target: Target) -> int | None:
    timeout = target.settings.lock_wait_timeout
    return None if timeout is None else max(1, int(timeout.total_seconds() * 1000))


def pg_dump_compression(target: Target) -> int:
    # custom+gzip lets pg_dump compress (pg_restore needs that archive as is); otherwise we
    # compress the stream ourselves and pg_dump writes its data uncompressed.
    settings = target.settings
    return settings.effective_compression_level if settings.compression == "gzip" else 0


def pg_dump_argv(
    tools: PgTools, target: Target, snapshot: str, folder: Path | None = None
) -> list[str]:
    settings = target.settings
    argv = [tools.path("pg_dump"), "--no-password", f"--snapshot={snapshot}"]
    lock_wait = lock_wait_ms(target)
    if lock_wait is not None:
        argv.append(f"--lock-wait-timeout={lock_wait}")
    if settings.format == "custom":
        argv += ["--format=custom", f"--compress={pg_dump_compression(target)}"]
    elif settings.format == "directory":
        # gzip: pg_dump's workers compress each data file; zstd: the tar is compressed whole.
        assert folder is not None
        # --no-sync: the folder is scratch; the backup file made from it is what gets fsynced.
        argv += [
            "--format=directory",
            f"--jobs={settings.dump_jobs}",
            f"--compress={pg_dump_compression(target)}",
            "--no-sync",
            f"--file={folder}",
        ]
    else:
        argv += ["--format=plain"]
    return argv


# pg_dump --lock-wait-timeout cancels its LOCK TABLE with a statement timeout (PG 15) or a
# lock timeout.
_PG_DUMP_LOCK_TIMEOUT = re.compile(
    r"canceling statement due to (statement|lock) timeout.*\n.*LOCK TABLE", re.DOTALL
)


def pg_dump_failure(
    target: Target, source: DumpSource, returncode: int, text: str
) -> BackupFailedError:
    if _PG_DUMP_LOCK_TIMEOUT.search(text):
        return lock_wait_failure(target, source.info)
    detail = one_line(source.info.redact(text)) or f"exit status {returncode}"
    return BackupFailedError(
        f"pg_dump failed for target '{target.name}' ({source.info.describe()}): {detail}",
        hint=_pg_dump_hint(text),
    )


def _pg_dump_hint(stderr_text: str) -> str:
    if "could not obtain lock on relation" in stderr_text:
        # pg_dump -j's workers lock each table again without waiting (a queued exclusive
        # lock would otherwise deadlock them against the leader).
        return (
            "another session asked for an exclusive lock on a table (e.g. a migration's ALTER "
            "TABLE) while the parallel dump ran; run the backup again when it is done, or set "
            "jobs: 1 for a dump that waits for locks"
        )
    if "row-level security" in stderr_text:
        return (
            "a row-level security policy would hide rows from the backup role, and a backup "
            "must hold every row: give the role BYPASSRLS (ALTER ROLE ... BYPASSRLS) or back up "
            "as a superuser"
        )
    return (
        "read the pg_dump error above; common causes are missing privileges "
        "(the backup role needs SELECT on every table) or a dropped connection"
    )


_BLOCKERS_SHOWN = 5


def lock_wait_failure(target: Target, info: ConnectionInfo) -> BackupFailedError:
    """The error for a backup that waited ``lock_wait_timeout`` for a table lock: names the
    sessions holding (or queueing for) the blocking locks, looked up on a new connection."""
    timeout = target.settings.lock_wait_timeout
    waited = f"{timeout.total_seconds():g}s" if timeout is not None else "too long"
    end_them = "SELECT pg_terminate_backend(PID)"
    import psycopg

    try:
        with connect(info, autocommit=True) as conn:
            blockers = lock_blockers(conn)
        if blockers:
            shown = [line for _, line in blockers[:_BLOCKERS_SHOWN]]
            if len(blockers) > _BLOCKERS_SHOWN:
                shown.append(f"and {len(blockers) - _BLOCKERS_SHOWN} more")
            culprit = "blocked by " + "; ".join(shown)
            pids = [str(pid) for pid, _ in blockers if pid is not None]
            if pids:
                end_them = f"SELECT pg_terminate_backend({pids[0]})"
        else:
            culprit = "the session that held it had released it by the time we looked"
    except (BackupPipelinesError, psycopg.Error) as exc:
        reason = exc.message if isinstance(exc, BackupPipelinesError) else str(exc).strip()
        culprit = f"the blocking session could not be looked up ({info.redact(reason)})"
    return BackupFailedError(
        f"backup of target '{target.name}' ({info.describe()}) gave up after waiting {waited} "
        f"(lock_wait_timeout) for a table lock: {culprit}",
        hint=f"let that session finish or end it ({end_them}), then run the backup again; "
        "if such long locks are expected, raise lock_wait_timeout for the target",
    )


class SnapshotScan:
    """Exact row counts by ``count(*)`` in the dump's snapshot, on a connection of its own (an
    error here must not abort the exporting transaction pg_dump depends on). Run beside pg_dump
    (``start``) when the rows cannot be counted from the stream, or after it (``run``) when the
    stream could not be read as expected."""

    def __init__(self, target: Target, info: ConnectionInfo, snapshot: str) -> None:
        self._target = target
        self._info = info
        self._snapshot = snapshot
        self._counts: dict[str, int] = {}
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="row-counts", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        from psycopg import sql

        try:
            with connection_in_snapshot(self._info, self._snapshot) as counting:
                # Counting runs beside pg_dump: parallel workers would only steal its CPU.
                counting.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                lock_wait = lock_wait_ms(self._target)
                if lock_wait is not None:
                    counting.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_wait}ms"))
                    )
                self._counts.update(table_row_counts(counting, lock_first=True))
        except BaseException as exc:  # reported by result(), after pg_dump finishes
            self._errors.append(exc)

    def result(self) -> dict[str, int]:
        import psycopg

        self.join()
        if self._errors and isinstance(self._errors[0], psycopg.errors.LockNotAvailable):
            raise lock_wait_failure(self._target, self._info)
        if self._errors:
            reason = self._info.redact(str(self._errors[0]))
            raise BackupFailedError(f"counting rows in the dump's snapshot failed: {reason}")
        return self._counts
