"""Restoring a backup: the safe in-place restore of a target, and the restore test that proves a backup.

A plain-SQL restore runs ``psql -v ON_ERROR_STOP=1 --single-transaction`` (psql otherwise
exits 0 after failed statements); a custom-format restore runs ``pg_restore --exit-on-error``
in parallel. Restores always go into a *new* database, so a failure never touches another one.

The in-place restore of a target (:func:`restore_database`) goes step by step and touches the
live database only in the last step:

1. ``locate``: open the backup (path under the backup root, ``s3://`` in the bucket, or
   ``latest``) and check it is a backup of this target's database.
2. ``confirm``: the operator types the target's name (or passes it).
3. ``verify``: checksum, decryption and decompression of the whole backup.
4. ``safety_backup``: a ``pre-restore`` backup of the current database (abort if it fails).
5. ``restore``: into a new database ``<db>_restoring_<time>``.
6. ``check``: every table's row count against the backup's ``.meta``.
7. ``swap``: block connections to the live database, terminate its sessions, and rename both
   databases in one transaction; the replaced one is kept as ``<db>_pre_restore_<time>``.

A failure in steps 1-7 leaves the live database as it was; the error names the step and the
safety backup.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    list_artifacts,
    load_artifact,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.backup.files import ensure_target_dirs
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.confirm import require_confirmation
from backup_pipelines.engine.errors import (
    BackupPipelinesError,
    IntegrityError,
    RefusedError,
    RestoreFailedError,
)
from backup_pipelines.engine.fsutil import ensure_private_dir, exclusive_lock, open_private
from backup_pipelines.engine.listing import newest_backup
from backup_pipelines.engine.offsite import offsite_storage
from backup_pipelines.engine.postgres import (
    ConnectionInfo,
    PgTools,
    connect,
    find_tools,
    server_major,
    table_row_counts,
)
from backup_pipelines.engine.processes import one_line, pid_alive, spawn, stop
from backup_pipelines.engine.reader import dump_chunks, outer_codec
from backup_pipelines.engine.storage import (
    S3_SCHEME,
    S3Storage,
    list_stored_backups,
    open_backup,
    parse_s3_url,
)
from backup_pipelines.engine.verify import verify_artifact

logger = logging.getLogger("backup_pipelines")

DEFAULT_PROGRESS_INTERVAL_SECONDS = 10.0
# Backups that are not what an operator means by "the latest backup of the target".
NOT_LATEST_PURPOSES = frozenset({"pre-restore"})
PREVIOUS_COPY_MARKER = "backup_pipelines:pre_restore"
SESSION_EXIT_TIMEOUT_SECONDS = 30.0


class RestoreRefusedError(RefusedError):
    """The request was refused before anything was touched (bad backup location, wrong database)."""


class RestoreStepError(RestoreFailedError):
    """A restore stopped at ``step``; the live database is as it was before the restore."""

    def __init__(
        self,
        step: str,
        message: str,
        hint: str | None = None,
        *,
        safety_backup: str | None = None,
    ) -> None:
        self.step = step
        self.safety_backup = safety_backup
        super().__init__(message, hint)


# --- progress ---------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


class Progress:
    """Logs ``done of total`` for a long step, at most once per ``interval`` seconds."""

    def __init__(self, log: Any, label: str, total: int | None, unit: str, interval: float) -> None:
        self.log = log
        self.label = label
        self.total = total or None
        self.unit = unit
        self.interval = interval
        self.done = 0
        self._last = time.monotonic()

    def _describe(self, done: int) -> str:
        if self.unit == "bytes":
            amount = _mib(done) + (f" of {_mib(self.total)}" if self.total else "")
        else:
            amount = f"{done}" + (f" of {self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            amount += f" ({min(100.0, 100.0 * done / self.total):.0f}%)"
        return amount

    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info(f"{self.label} progress: {self._describe(done)}")

    def finish(self) -> None:
        self.log.info(f"{self.label} progress: {self._describe(self.done)}, done")


# --- restore test (backup --test) and the building blocks -------------------------------------


@dataclass
class RestoreTestResult:
    """Outcome of restoring a backup into a scratch database and comparing row counts."""

    passed: bool
    scratch_database: str
    duration_seconds: float
    tables_checked: int
    rows_checked: int
    mismatches: dict[str, dict[str, int | None]] = field(default_factory=dict)

    def summary(self) -> str:
        if self.passed:
            return (
                f"restore test passed: {self.tables_checked} tables, {self.rows_checked} rows "
                f"match the backup's metadata ({self.duration_seconds:.1f}s)"
            )
        return "restore test FAILED, row counts differ: " + describe_mismatches(self.mismatches)


def compare_counts(
    expected: dict[str, int], restored: dict[str, int]
) -> dict[str, dict[str, int | None]]:
    mismatches: dict[str, dict[str, int | None]] = {}
    for table in sorted(set(expected) | set(restored)):
        if expected.get(table) != restored.get(table):
            mismatches[table] = {"expected": expected.get(table), "restored": restored.get(table)}
    return mismatches


def describe_mismatches(mismatches: dict[str, dict[str, int | None]], limit: int = 20) -> str:
    lines = [
        f"{table}: expected {m['expected']}, restored {m['restored']}"
        for table, m in sorted(mismatches.items())
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more tables"]
    return "; ".join(lines)


def scratch_name(prefix: str, target: str) -> str:
    return f"{prefix}_{target}_{int(time.time())}_{secrets.token_hex(3)}"[:63]


def create_database(
    admin: ConnectionInfo, name: str, artifact: BackupArtifact | None = None
) -> None:
    """CREATE DATABASE from template0 with the source's encoding and locale when known."""
    options = sql.SQL("")
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


def drop_database(admin: ConnectionInfo, name: str) -> None:
    with connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _is_bare_local_file(artifact: BackupArtifact) -> bool:
    return (
        artifact.is_local
        and outer_codec(artifact.meta.format, artifact.meta.compression) == "none"
        and artifact.meta.encryption.get("mode", "none") == "none"
    )


@contextlib.contextmanager
def _dump_file_for_pg_restore(
    artifact: BackupArtifact, work_dir: Path, progress: Progress | None = None
) -> Iterator[Path]:
    """pg_restore -j needs a seekable file: use the backup itself when it is a bare custom archive."""
    if _is_bare_local_file(artifact):
        yield artifact.path
        return
    tmp_dir = work_tmp_dir(work_dir, "restore")
    try:
        path = tmp_dir / "archive.dump"
        with open_private(path) as handle:
            for chunk in dump_chunks(artifact):
                handle.write(chunk)
                if progress is not None:
                    progress.advance(len(chunk))
        if progress is not None:
            progress.finish()
        yield path
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# pg_restore --verbose chatter: counted for progress, kept out of error messages.
_PG_RESTORE_ITEM_DONE = re.compile(r"^pg_restore: (processing|finished) item \d+")
_PG_RESTORE_CHATTER = re.compile(
    r"^pg_restore: (processing|finished|launching|creating|executing|entering|connecting)\b"
)


class _PgRestoreOutput:
    """Drains pg_restore --verbose stderr: counts finished TOC items, keeps the real messages."""

    def __init__(self, stream: IO[bytes], progress: Progress) -> None:
        self.progress = progress
        self._lines: collections.deque[str] = collections.deque(maxlen=40)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        done = 0
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if _PG_RESTORE_ITEM_DONE.match(line):
                done += 1
                total = self.progress.total
                self.progress.update(min(done, total) if total else done)
            elif line and not _PG_RESTORE_CHATTER.match(line):
                self._lines.append(line)
        stream.close()

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self._lines)


def _toc_entries(tools: PgTools, archive: Path) -> int | None:
    result = subprocess.run(
        [tools.path("pg_restore"), "--list", str(archive)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(b";"))


_MISSING_ROLE = re.compile(r'role "((?:[^"]|"")+)" does not exist')


def restore_error_hint(error_text: str) -> str | None:
    """What to do about a restore error we recognise (None: the error speaks for itself)."""
    missing = _MISSING_ROLE.search(error_text)
    if missing:
        return (
            f"the backup's objects belong to roles this server does not have (role "
            f"{missing.group(1)!r}): pg_dump does not carry roles, so create them here first, "
            "e.g. `pg_dumpall --roles-only` on the source server piped into psql on this one"
        )
    return None


def restore_into(
    artifact: BackupArtifact,
    database: ConnectionInfo,
    *,
    tools: PgTools,
    jobs: int = 2,
    work_dir: Path,
    log: Any,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
) -> None:
    """Load ``artifact`` into the existing, empty database ``database``. Raises on any error.

    Progress (bytes of SQL fed to psql, or TOC items pg_restore finished) is logged at most
    every ``progress_interval`` seconds.
    """
    env = database.child_env()
    name = Path(artifact.location).name
    if artifact.meta.format == "custom":
        spool = None
        if not _is_bare_local_file(artifact):
            spool = Progress(
                log, "Decoding archive", artifact.meta.dump_bytes, "bytes", progress_interval
            )
        with _dump_file_for_pg_restore(artifact, work_dir, spool) as archive:
            progress = Progress(
                log, "pg_restore", _toc_entries(tools, archive), "items", progress_interval
            )
            argv = [
                tools.path("pg_restore"),
                "--no-password",
                "--exit-on-error",
                "--verbose",
                f"--jobs={jobs}",
                database.dbname_option(),
                str(archive),
            ]
            log.info(f"Restoring {name} with pg_restore -j {jobs} into {database.describe()}")
            proc = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            assert proc.stderr is not None
            output = _PgRestoreOutput(proc.stderr, progress)
            try:
                returncode = proc.wait()
            except BaseException:
                stop(proc)
                raise
            if returncode != 0:
                detail = database.redact(output.text())
                raise RestoreFailedError(
                    f"pg_restore failed restoring {name} into {database.describe()}: "
                    f"{one_line(detail) or f'exit status {returncode}'}",
                    hint=restore_error_hint(detail),
                )
            output.text()
            progress.finish()
        return
    argv = [
        tools.path("psql"),
        "--no-password",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        database.dbname_option(),
    ]
    log.info(f"Restoring {name} with psql --single-transaction into {database.describe()}")
    proc, stderr = spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    progress = Progress(log, "psql", artifact.meta.dump_bytes, "bytes", progress_interval)
    try:
        for chunk in dump_chunks(artifact):
            proc.stdin.write(chunk)
            progress.advance(len(chunk))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # psql stopped reading: its exit status and stderr say why
    except BaseException:
        stop(proc)
        raise
    if proc.wait() != 0:
        detail = database.redact(stderr.text())
        raise RestoreFailedError(
            f"psql failed restoring {name} into {database.describe()} "
            f"(nothing was committed): {one_line(detail)}",
            hint=restore_error_hint(detail),
        )
    progress.finish()


# restore-<pid>@<host>-<random>: whose folder it is, so a cleanup can tell a killed run's from a
# running one's (the work folder is shared by every target and by drills).
_WORK_TMP_RE = re.compile(r"^(?:restore|download)-(\d+)@(.+)-[A-Za-z0-9_]{8}$")


def work_tmp_dir(work_dir: Path, kind: str) -> Path:
    """A private temporary folder in ``work_dir`` named after this process and host."""
    ensure_private_dir(work_dir)
    prefix = f"{kind}-{os.getpid()}@{socket.gethostname()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))


def remove_abandoned_work_dirs(work_dir: Path, *, log: Any = None) -> list[Path]:
    """Remove temporary folders (decoded archives, downloads) of restores and drills that were
    killed: made on this host by a process that is gone. Returns what was removed."""
    log = log or logger
    removed: list[Path] = []
    if not work_dir.is_dir():
        return removed
    for entry in sorted(work_dir.iterdir()):
        match = _WORK_TMP_RE.match(entry.name)
        if match is None or not entry.is_dir() or match.group(2) != socket.gethostname():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning(f"Removed {entry}: temporary files of an interrupted run (pid {pid})")
        removed.append(entry)
    return removed


def work_dir_for(target: Target) -> Path:
    return target.backup_dir.parent / ".work"


def server_tools(admin: ConnectionInfo, target: Target) -> PgTools:
    with connect(admin) as conn:
        major = server_major(conn.info.server_version)
    return find_tools(major, target.settings.pg_bin_dir)


def restore_test(target: Target, artifact: BackupArtifact, *, log: Any) -> RestoreTestResult:
    """Restore into a scratch database, compare every table's row count with ``.meta``, drop it."""
    admin = ConnectionInfo.parse(
        target.scratch_dsn(), source=f"target '{target.name}' scratch server"
    )
    tools = server_tools(admin, target)
    name = scratch_name("bp_test", target.name)
    scratch = admin.with_dbname(name)
    started = time.monotonic()
    drop_leftover_databases(admin, target, SCRATCH_MARKER, log=log)
    create_database(admin, name, artifact)
    try:
        mark_database(admin, name, SCRATCH_MARKER, target)
        try:
            restore_into(
                artifact,
                scratch,
                tools=tools,
                jobs=target.settings.restore_jobs,
                work_dir=work_dir_for(target),
                log=log,
            )
        except BackupPipelinesError as exc:
            raise RestoreFailedError(
                f"restore test of {Path(artifact.location).name} failed: {exc.message}",
                hint=exc.hint
                or "the backup cannot be restored as is; keep the previous backups and investigate",
            ) from None
        with connect(scratch) as conn:
            restored = table_row_counts(conn, with_children=artifact.meta.row_counts_with_children)
    finally:
        drop_database(admin, name)
    mismatches = compare_counts(artifact.meta.row_counts, restored)
    return RestoreTestResult(
        passed=not mismatches,
        scratch_database=name,
        duration_seconds=round(time.monotonic() - started, 3),
        tables_checked=len(restored),
        rows_checked=sum(restored.values()),
        mismatches=mismatches,
    )


# --- finding the backup to restore ------------------------------------------------------------


def latest_local_backup(target: Target) -> BackupArtifact | None:
    """The newest complete local backup of ``target`` that is not known to be bad.

    Safety backups taken before a restore are skipped: "restore latest" must not bring back
    the state a previous restore just replaced. Backups dated in the future are skipped too
    (see :func:`~backup_pipelines.engine.listing.newest_backup`).
    """
    return newest_backup(list_artifacts(target.backup_dir), skip_purposes=NOT_LATEST_PURPOSES)


def configured_offsite_storage(target: Target) -> S3Storage | None:
    """The target's offsite folder ``s3://bucket/<prefix>/<target>/``; None when offsite is off."""
    if not target.settings.offsite.is_enabled:
        return None
    return offsite_storage(target)


def latest_offsite_backup(target: Target) -> BackupArtifact | None:
    """The newest usable offsite copy of ``target`` (None when offsite copies are off)."""
    storage = configured_offsite_storage(target)
    if storage is None:
        return None
    return newest_backup(list_stored_backups(storage), skip_purposes=NOT_LATEST_PURPOSES)


def _locate_s3(target: Target, location: str) -> BackupArtifact:
    bucket, key = parse_s3_url(location)
    storage = configured_offsite_storage(target)
    if storage is None:
        raise RestoreRefusedError(
            f"{location} is in S3, but target '{target.name}' has no offsite bucket configured",
            hint="set offsite.bucket for the target (or $S3_BACKUP_BUCKET)",
        )
    allowed = storage.url() + "/"
    if bucket != storage.bucket or not location.startswith(allowed):
        raise RestoreRefusedError(
            f"backup {location} is outside the configured bucket folder {allowed}",
            hint=f"restore only offsite copies of '{target.name}' under {allowed}",
        )
    return open_backup(location)


def locate_backup(config: ProjectConfig, target: Target, backup: str) -> BackupArtifact:
    """Open the backup an operator named: ``latest``, a local path or an ``s3://`` location.

    Local paths must lie under the configured backup root, so a typo or a stray file from
    elsewhere is never restored into a configured database.
    """
    spec = backup.strip()
    if not spec:
        raise RestoreRefusedError(
            "no backup given", hint="name a backup file, an s3:// location, or 'latest'"
        )
    if spec == "latest":
        # Local first (no download); the offsite copy when this host lost its backups.
        artifact = latest_local_backup(target) or latest_offsite_backup(target)
        if artifact is None:
            raise RestoreRefusedError(
                f"target '{target.name}' has no usable backup in {target.backup_dir}"
                + (" or offsite" if configured_offsite_storage(target) else ""),
                hint=f"take one with `backup-pipelines backup {target.name}` or name a backup file",
            )
        return artifact
    if spec.startswith(S3_SCHEME):
        return _locate_s3(target, spec)
    root = config.resolved_backup_root
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise RestoreRefusedError(
            f"backup {resolved} is outside the backup root {root}",
            hint=f"restore only backups kept under {root} (copy the file with its .sha256 and "
            f".meta into {root / target.name} first if you trust it)",
        )
    return load_artifact(resolved)


def check_backup_matches_target(artifact: BackupArtifact, target: Target, database: str) -> None:
    """Refuse a backup taken of another target or another database."""
    meta = artifact.meta
    if meta.target != target.name or meta.database != database:
        raise RestoreRefusedError(
            f"{Path(artifact.location).name} is a backup of database '{meta.database}' "
            f"(target '{meta.target}'), not of database '{database}' (target '{target.name}')",
            hint=f"choose a backup of '{target.name}' (`backup-pipelines list {target.name}`); "
            "to copy another database's data here on purpose, pass --allow-other-database "
            "(allow_other_database: true in the run config)",
        )


# --- the in-place restore ---------------------------------------------------------------------


@dataclass
class RestoreReport:
    """What a successful restore did; every value is safe to log and to show in the UI."""

    target: str
    database: str
    server: str
    backup: str
    backup_taken_at: datetime
    safety_backup: str | None
    previous_database: str | None
    previous_dropped: bool
    tables: int
    rows: int
    terminated_sessions: int
    duration_seconds: float
    step_seconds: dict[str, float]
    expired_copies_dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"restored {self.backup} into {self.server} "
            f"(database {self.database}) in {self.duration_seconds:.1f}s",
            f"  {self.tables} tables, {self.rows} rows match the backup's metadata",
            f"  safety backup: {self.safety_backup or 'none (the database did not exist)'}",
        ]
        if self.previous_database and not self.previous_dropped:
            lines.append(f"  previous database kept as: {self.previous_database}")
        elif self.previous_database:
            lines.append(f"  previous database dropped: {self.previous_database}")
        if self.terminated_sessions:
            lines.append(f"  terminated {self.terminated_sessions} open session(s)")
        for name in self.expired_copies_dropped:
            lines.append(f"  dropped expired previous copy: {name}")
        lines.append(
            "  steps: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in self.step_seconds.items())
        )
        return "\n".join(lines)


def _restore_lock(
    target: Target, *, hint: str = "wait for it to finish"
) -> contextlib.AbstractContextManager[None]:
    """Held by a restore of ``target`` from start to end; a dead holder releases it."""
    ensure_target_dirs(target)
    lock_path = target.backup_dir / ".restore.lock"
    return exclusive_lock(
        lock_path,
        lambda: RestoreRefusedError(
            f"another restore of target '{target.name}' is running ({lock_path})", hint=hint
        ),
    )


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d_%H%M%S")


def _free_name(conn: psycopg.Connection, base: str, suffix: str) -> str:
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


def _database_exists(conn: psycopg.Connection, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
    )


def _copy_database_properties(conn: psycopg.Connection, source: str, dest: str) -> None:
    """Give the restored database the live one's owner, privileges and settings.

    pg_dump without --create leaves database-level properties out of the dump; without this
    the application role could lose CONNECT or its per-database settings after the swap.
    """
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba), datacl IS NULL FROM pg_database WHERE datname = %s",
        (source,),
    ).fetchone()
    assert row is not None
    owner, default_acl = row
    ident = sql.Identifier(dest)
    conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(owner)))
    if not default_acl:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        grants = conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
            "a.privilege_type, a.is_grantable FROM pg_database d, aclexplode(d.datacl) a "
            "WHERE d.datname = %s",
            (source,),
        ).fetchall()
        for grantee, privilege, grantable in grants:
            conn.execute(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(privilege),
                    ident,
                    sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                    sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL(""),
                )
            )
    settings = conn.execute(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, "
        "s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = %s",
        (source,),
    ).fetchall()
    for role, config in settings:
        for item in config or []:
            key, _, value = item.partition("=")
            statement = sql.SQL("ALTER {} DATABASE {} SET {} = {}").format(
                sql.SQL("ROLE {} IN").format(sql.Identifier(role)) if role else sql.SQL(""),
                ident,
                sql.Identifier(key),
                sql.Literal(value),
            )
            conn.execute(statement)


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


def _swap(
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


RESTORING_MARKER = "backup_pipelines:restoring"
SCRATCH_MARKER = "backup_pipelines:scratch"


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


def _process_alive(host: object, pid: object) -> bool:
    if host != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return pid_alive(pid)


def drop_leftover_databases(
    admin: ConnectionInfo, target: Target, marker: str, *, log: Any = None
) -> list[str]:
    """Drop databases a killed restore or drill of ``target`` left behind.

    Only databases carrying our ``marker`` for this target, with no session connected and
    whose creating process is gone, are dropped: an in-progress run is never disturbed.
    """
    log = log or logger
    dropped = []
    with connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database'), "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) "
            "FROM pg_database d WHERE shobj_description(d.oid, 'pg_database') LIKE %s",
            (f'%"{marker}"%',),
        ).fetchall()
        for name, comment, sessions in rows:
            try:
                label = json.loads(comment)
            except ValueError:
                continue
            if label.get("marker") != marker or label.get("target") != target.name:
                continue
            if sessions or _process_alive(label.get("host"), label.get("pid")):
                continue
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            log.warning(
                f"Dropped {name}, left behind by an interrupted run (pid {label.get('pid')} "
                f"on {label.get('host')}, started {label.get('created_at')})"
            )
            dropped.append(name)
    return dropped


def _restoring_name_of(name: str, database: str) -> bool:
    """True when ``name`` is what :func:`_free_name` makes of ``database`` for a restore."""
    match = _RESTORING_SUFFIX.search(name)
    if match is None:
        return False
    tail = name[match.start() :]
    return name[: match.start()] == database.encode()[: 63 - len(tail.encode())].decode(
        "utf-8", "ignore"
    )


_RESTORING_SUFFIX = re.compile(r"_restoring_\d{8}_\d{6}(?:_\d{1,2})?$")


@dataclass
class LeftoverReport:
    """What a cleanup found of restores that were killed: dropped, or left alone and why."""

    dropped: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)


def _restoring_label(comment: str | None, target: Target) -> dict[str, Any] | None:
    """The label a restore of ``target`` put on its copy; None when absent or someone else's."""
    try:
        label = json.loads(comment) if comment else None
    except ValueError:
        return None
    if isinstance(label, dict) and label.get("marker") == RESTORING_MARKER:
        return label if label.get("target") == target.name else None
    return None


def drop_interrupted_restores(
    admin: ConnectionInfo, target: Target, database: str, *, log: Any = None
) -> LeftoverReport:
    """Drop the ``<database>_restoring_<time>`` databases killed restores of ``target`` left.

    The caller holds the target's restore lock, so no restore of it is running on this host.
    Dropped: databases labelled as ``target``'s restoring copy whose creating process is gone,
    and unlabelled ones with exactly the name a restore of ``database`` gives its copy (a
    restore killed between CREATE DATABASE and its label). Never the live ``database``, never a
    database with a session connected (e.g. a pg_restore the killed run left behind), never a
    database labelled by anyone else.
    """
    log = log or logger
    report = LeftoverReport(
        dropped=drop_leftover_databases(admin, target, RESTORING_MARKER, log=log)
    )
    with connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database'), "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) "
            "FROM pg_database d WHERE d.datname LIKE '%\\_restoring\\_%'"
        ).fetchall()
        for name, comment, sessions in rows:
            if name == database or not _restoring_name_of(name, database):
                continue
            label = _restoring_label(comment, target)
            if comment and label is None:
                continue  # labelled by someone else: not ours to judge
            if sessions:
                report.left_alone[name] = (
                    f"{sessions} session(s) still connected (a process of the interrupted "
                    "restore may still be writing it)"
                )
            elif label is not None:
                report.left_alone[name] = (
                    f"the process that created it (pid {label.get('pid')} on "
                    f"{label.get('host')}) is still running"
                )
            else:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
                log.warning(f"Dropped {name}, left behind by a restore killed before labelling it")
                report.dropped.append(name)
    for name, reason in report.left_alone.items():
        log.warning(f"Left {name} alone: {reason}")
    return report


@dataclass
class RestoreCleanupReport:
    """What ``restore-cleanup`` did for one target."""

    interrupted: LeftoverReport
    expired: list[str]
    kept: list[tuple[str, datetime]]
    grace_hours: float | None
    work_dirs_removed: list[Path] = field(default_factory=list)


def restore_cleanup(
    target: Target, *, log: Any = None, now: datetime | None = None
) -> RestoreCleanupReport:
    """Drop what killed restores of ``target`` left (``<db>_restoring_<time>`` databases, and
    temporary files of killed restores and drills in the work folder) and the databases
    earlier restores replaced once past their grace period; report what is kept.

    Runs under the target's restore lock: while a restore of the target runs, it refuses
    (RestoreRefusedError) and drops nothing. The live database is never touched.
    """
    log = log or logger
    admin = maintenance_connection(target)
    live = ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}'").dbname
    with _restore_lock(
        target,
        hint="its databases are in use: run restore-cleanup again once it has finished "
        "(nothing was dropped)",
    ):
        interrupted = drop_interrupted_restores(admin, target, live, log=log)
        work_dirs = remove_abandoned_work_dirs(work_dir_for(target), log=log)
        expired = drop_expired_previous_copies(target, log=log, now=now)
        with connect(admin, autocommit=True) as conn:
            kept = previous_copies(conn, target)
    return RestoreCleanupReport(
        interrupted, expired, kept, target.settings.restore.drop_previous_after_hours, work_dirs
    )


@contextlib.contextmanager
def local_copy(
    artifact: BackupArtifact,
    work_dir: Path,
    *,
    log: Any,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
) -> Iterator[BackupArtifact]:
    """A remote backup downloaded once, with its sidecars, into a private temporary folder.

    Streamed to disk (memory stays flat); verification and the restore then read the local
    file instead of downloading the object again, and pg_restore -j gets a seekable file.
    """
    if artifact.is_local:
        yield artifact
        return
    tmp_dir = work_tmp_dir(work_dir, "download")
    try:
        path = tmp_dir / artifact.path.name
        recorded = artifact.recorded_sha256()
        progress = Progress(
            log,
            f"Download of {artifact.location}",
            artifact.meta.size_bytes,
            "bytes",
            progress_interval,
        )
        with open_private(path) as handle:
            for chunk in artifact.stored_chunks():
                handle.write(chunk)
                progress.advance(len(chunk))
        progress.finish()
        with open_private(path.with_name(path.name + SHA256_SUFFIX)) as handle:
            handle.write(sha256_line(recorded, path.name).encode())
        write_meta(path.with_name(path.name + META_SUFFIX), artifact.meta)
        yield BackupArtifact(path, artifact.meta)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def previous_copies(conn: psycopg.Connection, target: Target) -> list[tuple[str, datetime]]:
    """Databases a restore of ``target`` replaced and kept, with the time they were replaced."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE shobj_description(oid, 'pg_database') LIKE %s",
        (f'%"{PREVIOUS_COPY_MARKER}"%',),
    ).fetchall()
    copies = []
    for name, comment in rows:
        try:
            info = json.loads(comment)
            if info.get("marker") != PREVIOUS_COPY_MARKER or info.get("target") != target.name:
                continue
            copies.append((name, datetime.fromisoformat(info["replaced_at"])))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(copies, key=lambda item: item[1])


def drop_expired_previous_copies(
    target: Target, *, log: Any = None, now: datetime | None = None
) -> list[str]:
    """Drop the databases earlier restores replaced, once older than the grace period."""
    log = log or logger
    grace = target.settings.restore.drop_previous_after_hours
    if grace is None:
        return []
    admin = maintenance_connection(target)
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=grace)
    dropped = []
    with connect(admin, autocommit=True) as conn:
        for name, replaced_at in previous_copies(conn, target):
            if replaced_at <= cutoff:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
                log.info(
                    f"Dropped {name}: replaced by a restore at {replaced_at.isoformat()}, "
                    f"older than the {grace:g} h grace period"
                )
                dropped.append(name)
    return dropped


def maintenance_connection(target: Target) -> ConnectionInfo:
    live = ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )
    return live.with_dbname(target.settings.restore.maintenance_database)


def restore_database(
    config: ProjectConfig,
    target_name: str,
    backup: str,
    *,
    confirm: str | None,
    log: Any = None,
    prompt: Callable[[str], str] | None = None,
    allow_other_database: bool = False,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
) -> RestoreReport:
    """Replace the target's database with ``backup``, safely (see the module docstring).

    Raises ConfigError (unknown target), RestoreRefusedError or ConfirmationError (nothing
    touched), or RestoreStepError naming the failed step and the safety backup.
    """
    log = log or logger
    started = time.monotonic()
    steps: dict[str, float] = {}
    target = config.target(target_name)
    live_info = ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )
    database = live_info.dbname
    admin = live_info.with_dbname(target.settings.restore.maintenance_database)
    if database == admin.dbname:
        raise RestoreRefusedError(
            f"target '{target.name}' restores into database '{database}', which is also the "
            "maintenance database the restore connects to (a database cannot be renamed while "
            "connected to it)",
            hint="set restore.maintenance_database for the target to another database, e.g. template1",
        )

    clock = time.monotonic()
    artifact = locate_backup(config, target, backup)
    if not allow_other_database:
        check_backup_matches_target(artifact, target, database)
    steps["locate"] = time.monotonic() - clock
    meta = artifact.meta
    require_confirmation(
        target.name,
        confirm,
        action=(
            f"replace database '{database}' on {admin.describe().rsplit('/', 1)[0]} with "
            f"{Path(artifact.location).name} (taken {meta.started_at.isoformat()})"
        ),
        prompt=prompt,
    )
    log.info(
        f"Restoring {artifact.location} (database {meta.database}, taken "
        f"{meta.started_at.isoformat()}, {meta.format}/{meta.compression}, encryption "
        f"{meta.encryption.get('mode', 'none')}) into target '{target.name}' ({live_info.describe()})"
    )

    safety: str | None = None

    def fail(step: str, exc: BaseException, extra_hint: str | None = None) -> RestoreStepError:
        cause = exc.message if isinstance(exc, BackupPipelinesError) else live_info.redact(str(exc))
        where = f"safety backup: {safety}" if safety else "no safety backup was needed or taken"
        hint_parts = [f"database '{database}' was not changed; {where}"]
        if extra_hint or (isinstance(exc, BackupPipelinesError) and exc.hint):
            hint_parts.append(extra_hint or exc.hint or "")
        return RestoreStepError(
            step,
            f"restore of target '{target.name}' failed at step '{step}': {cause}",
            hint="; ".join(hint_parts),
            safety_backup=safety,
        )

    with _restore_lock(target), contextlib.ExitStack() as cleanup:
        # 1. Integrity of the whole backup before anything is touched. An offsite copy is
        # downloaded once (streamed to the work folder), then verified and restored locally.
        if not artifact.is_local:
            clock = time.monotonic()
            try:
                local = cleanup.enter_context(
                    local_copy(
                        artifact, work_dir_for(target), log=log, progress_interval=progress_interval
                    )
                )
            except BackupPipelinesError as exc:
                raise fail("download", exc) from None
            steps["download"] = time.monotonic() - clock
        else:
            local = artifact
        clock = time.monotonic()
        log.info(f"Verifying {local.path.name} (checksum, decryption, decompression)")
        try:
            outcomes = verify_artifact(local)
        except BackupPipelinesError as exc:
            raise fail("verify", exc) from None
        for outcome in outcomes:
            if not outcome.passed:
                raise fail(
                    "verify",
                    IntegrityError(outcome.message),
                    outcome.hint
                    or "use another backup (`backup-pipelines list` shows them) or the offsite copy",
                ) from None
        steps["verify"] = time.monotonic() - clock
        log.info(f"Verified {local.path.name} in {steps['verify']:.1f}s")

        try:
            with connect(admin, autocommit=True) as conn:
                exists = _database_exists(conn, database)
            tools = server_tools(admin, target)
        except BackupPipelinesError as exc:
            raise fail("connect", exc) from None

        # 2. Safety backup of what is there now.
        clock = time.monotonic()
        if exists:
            log.info(f"Taking a pre-restore safety backup of {live_info.describe()}")
            try:
                safety = run_backup(target, purpose="pre-restore", log=log).location
            except BackupPipelinesError as exc:
                raise fail("safety_backup", exc) from None
            log.info(f"Safety backup written: {safety}")
        else:
            log.warning(
                f"Database '{database}' does not exist on the server: nothing to protect, "
                "no safety backup; the restore will create it"
            )
        steps["safety_backup"] = time.monotonic() - clock

        # 3. Restore into a new database, 4. check it; the live database is still untouched.
        try:
            drop_interrupted_restores(admin, target, database, log=log)
            remove_abandoned_work_dirs(work_dir_for(target), log=log)
            with connect(admin, autocommit=True) as conn:
                restoring = _free_name(conn, database, f"restoring_{_stamp(datetime.now(UTC))}")
        except (BackupPipelinesError, psycopg.Error) as exc:
            raise fail("restore", exc) from None
        clock = time.monotonic()
        try:
            try:
                create_database(admin, restoring, local)
                mark_database(admin, restoring, RESTORING_MARKER, target)
                restore_into(
                    local,
                    admin.with_dbname(restoring),
                    tools=tools,
                    jobs=target.settings.restore_jobs,
                    work_dir=work_dir_for(target),
                    log=log,
                    progress_interval=progress_interval,
                )
            except BackupPipelinesError as exc:
                raise fail("restore", exc) from None
            except psycopg.Error as exc:
                raise fail("restore", exc) from None
            steps["restore"] = time.monotonic() - clock

            clock = time.monotonic()
            try:
                with connect(admin.with_dbname(restoring)) as conn:
                    restored = table_row_counts(conn, with_children=meta.row_counts_with_children)
            except (BackupPipelinesError, psycopg.Error) as exc:
                raise fail("check", exc) from None
            mismatches = compare_counts(meta.row_counts, restored)
            if mismatches:
                raise fail(
                    "check",
                    RestoreFailedError(
                        "row counts of the restored database differ from the backup's .meta: "
                        + describe_mismatches(mismatches)
                    ),
                    "the backup does not restore to what was dumped; use another backup",
                )
            log.info(
                f"Restored database {restoring}: {len(restored)} tables, "
                f"{sum(restored.values())} rows match the backup's metadata"
            )
            steps["check"] = time.monotonic() - clock

            # 5. Swap: the only step that touches the live database.
            clock = time.monotonic()
            previous: str | None = None
            terminated = 0
            try:
                with connect(admin, autocommit=True) as conn:
                    if exists:
                        _copy_database_properties(conn, database, restoring)
                        previous = _free_name(
                            conn, database, f"pre_restore_{_stamp(datetime.now(UTC))}"
                        )
                        terminated = _swap(conn, database, restoring, previous, target, log=log)
                    else:
                        with conn.transaction():
                            conn.execute(
                                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                    sql.Identifier(restoring), sql.Identifier(database)
                                )
                            )
                            conn.execute(
                                sql.SQL("COMMENT ON DATABASE {} IS NULL").format(
                                    sql.Identifier(database)
                                )
                            )
            except (BackupPipelinesError, psycopg.Error) as exc:
                raise fail(
                    "swap",
                    exc,
                    "the restoring role needs to own the database (or be superuser) and be "
                    "allowed to terminate its sessions (pg_signal_backend)",
                ) from None
            steps["swap"] = time.monotonic() - clock
        except BaseException:
            with contextlib.suppress(Exception):
                drop_database(admin, restoring)
            raise
    log.info(
        f"Database '{database}' now holds {Path(artifact.location).name}"
        + (f"; the replaced database is kept as {previous}" if previous else "")
    )

    previous_dropped = False
    expired: list[str] = []
    grace = target.settings.restore.drop_previous_after_hours
    try:
        if previous and grace == 0:
            drop_database(admin, previous)
            previous_dropped = True
            log.info(f"Dropped the replaced database {previous} (drop_previous_after_hours: 0)")
        expired = drop_expired_previous_copies(target, log=log)
    except BackupPipelinesError as exc:
        log.warning(f"Restore succeeded, but dropping old copies failed: {exc.message}")
    except psycopg.Error as exc:
        log.warning(f"Restore succeeded, but dropping old copies failed: {admin.redact(str(exc))}")

    return RestoreReport(
        target=target.name,
        database=database,
        server=admin.describe().rsplit("/", 1)[0],
        backup=artifact.location,
        backup_taken_at=meta.started_at,
        safety_backup=safety,
        previous_database=previous,
        previous_dropped=previous_dropped,
        tables=len(restored),
        rows=sum(restored.values()),
        terminated_sessions=terminated,
        duration_seconds=round(time.monotonic() - started, 3),
        step_seconds={step: round(seconds, 3) for step, seconds in steps.items()},
        expired_copies_dropped=expired,
    )
