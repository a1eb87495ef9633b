"""The logical backup of one database: pg_dump -> compress -> (encrypt) -> hash -> file, in one
streaming pass.

Memory stays flat whatever the database size: data moves in 1 MiB chunks from pg_dump's stdout
through the compressor and the hash into a ``.partial`` file. Only when pg_dump has exited 0,
the file is fsynced and its ``.sha256`` and ``.meta`` are written does the data file get its
final name, so a crash or a failure at any point leaves nothing that looks like a backup.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import (
    BackupArtifact,
    BackupMeta,
    backup_extension,
    backup_file_name,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.backup.counting import (
    python_encoding,
    reconcile_counts,
    stream_counter,
)
from backup_pipelines.engine.backup.directory import (
    DirectoryRowCounter,
    folder_size,
    remove_stale_work_folders,
    wait_for_dump_folder,
    work_folder,
    write_directory_tar,
)
from backup_pipelines.engine.backup.files import (
    HashingSink,
    discard_failed_backup,
    ensure_target_dirs,
    target_lock,
)
from backup_pipelines.engine.backup.globals import CapturedGlobals, capture_globals
from backup_pipelines.engine.compression import CHUNK_SIZE, compressor
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.encryption import encryption_stage_factory
from backup_pipelines.engine.errors import BackupFailedError, BackupPipelinesError, RefusedError
from backup_pipelines.engine.fsutil import fsync_dir, open_private, partial_path, write_atomic
from backup_pipelines.engine.postgres import (
    ConnectionInfo,
    PgTools,
    connect,
    find_tools,
    lock_blockers,
    server_major,
    table_row_counts,
    tables_with_data,
)
from backup_pipelines.engine.processes import one_line, spawn
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
from backup_pipelines.engine.reader import outer_codec
from backup_pipelines.engine.version import TOOL_VERSION

logger = logging.getLogger("backup_pipelines")


PREFETCH_CHUNKS = 8  # at most 8 MiB in flight between pg_dump and the compressor
_PIPE_SIZE = 1 << 20


def prefetched_chunks(
    stream: IO[bytes], observe: Callable[[bytes], None] | None = None
) -> Iterator[bytes]:
    """Read ``stream`` in a background thread while the caller compresses and writes.

    Without it pg_dump stalls on a full pipe whenever we compress; zlib, zstd, hashlib and
    file writes release the GIL, so reading and compressing overlap like a shell pipeline.
    ``observe`` sees every chunk in that thread too (the row counter), beside the compressor.
    """
    chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=PREFETCH_CHUNKS)
    stop = threading.Event()

    def pump() -> None:
        try:
            while not stop.is_set():
                chunk = stream.read(CHUNK_SIZE)
                if observe is not None:
                    observe(chunk)
                while not stop.is_set():
                    try:
                        chunks.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if not chunk:
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            with contextlib.suppress(queue.Full):
                chunks.put(exc, timeout=1)

    reader = threading.Thread(target=pump, name="pg_dump-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()


def _grow_pipe(stream: IO[bytes]) -> None:
    # A 1 MiB pipe lets pg_dump keep writing through short pauses of the consumer (Linux only).
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)


@dataclass(frozen=True)
class DumpSource:
    """A consistent view of one database: a connection holding an exported snapshot."""

    info: ConnectionInfo
    tools: PgTools
    server_version: str
    server_version_num: int
    snapshot: str
    encoding: str
    collate: str
    ctype: str


def _lock_wait_ms(target: Target) -> int | None:
    timeout = target.settings.lock_wait_timeout
    return None if timeout is None else max(1, int(timeout.total_seconds() * 1000))


def _pg_dump_compression(target: Target) -> int:
    # custom+gzip lets pg_dump compress (pg_restore needs that archive as is); otherwise we
    # compress the stream ourselves and pg_dump writes its data uncompressed.
    settings = target.settings
    return settings.effective_compression_level if settings.compression == "gzip" else 0


def _pg_dump_argv(
    tools: PgTools, target: Target, snapshot: str, folder: Path | None = None
) -> list[str]:
    settings = target.settings
    argv = [tools.path("pg_dump"), "--no-password", f"--snapshot={snapshot}"]
    lock_wait = _lock_wait_ms(target)
    if lock_wait is not None:
        argv.append(f"--lock-wait-timeout={lock_wait}")
    if settings.format == "custom":
        argv += ["--format=custom", f"--compress={_pg_dump_compression(target)}"]
    elif settings.format == "directory":
        # gzip: pg_dump's workers compress each data file; zstd: the tar is compressed whole.
        assert folder is not None
        # --no-sync: the folder is scratch; the backup file made from it is what gets fsynced.
        argv += [
            "--format=directory",
            f"--jobs={settings.dump_jobs}",
            f"--compress={_pg_dump_compression(target)}",
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


def _pg_dump_failure(
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


class _SnapshotScan:
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
        try:
            with connect(self._info) as counting:
                counting.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                # Counting runs beside pg_dump: parallel workers would only steal its CPU.
                counting.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                lock_wait = _lock_wait_ms(self._target)
                if lock_wait is not None:
                    counting.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_wait}ms"))
                    )
                counting.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self._snapshot))
                )
                self._counts.update(table_row_counts(counting, lock_first=True))
        except BaseException as exc:  # reported by result(), after pg_dump finishes
            self._errors.append(exc)

    def result(self) -> dict[str, int]:
        self.join()
        if self._errors and isinstance(self._errors[0], psycopg.errors.LockNotAvailable):
            raise lock_wait_failure(self._target, self._info)
        if self._errors:
            reason = self._info.redact(str(self._errors[0]))
            raise BackupFailedError(f"counting rows in the dump's snapshot failed: {reason}")
        return self._counts


def _final_path(backup_dir: Path, database: str, started: datetime, extension: str) -> Path:
    # Two backups in the same second (a manual run beside a scheduled one) must not collide.
    moment = started
    while True:
        candidate = backup_dir / backup_file_name(database, moment, extension)
        if not candidate.exists() and not partial_path(candidate).exists():
            return candidate
        moment += timedelta(seconds=1)


def run_backup(
    target: Target,
    *,
    log: Any = None,
    stage_factory: Any = None,
    purpose: str = "scheduled",
    progress: ProgressReporter | None = None,
) -> BackupArtifact:
    """Back up one target and return the new artifact. Raises BackupPipelinesError on failure.

    ``purpose`` is recorded in ``.meta`` (``scheduled``, ``manual``, ``pre-restore``, ...).
    The bytes pg_dump has written so far go to ``progress`` (default: lines in ``log``).

    ``stage_factory`` (used by encryption) wraps the hashing sink with more stages; it takes the
    sink and returns ``(writer, finish, encryption_meta)`` or ``(..., abort)`` with a cleanup
    called on failure. Without one, the target's ``encryption`` settings decide; their key is
    loaded before anything else happens, so a missing key never yields a plaintext backup.
    """
    log = log or logger
    settings = target.settings
    if target.is_server:
        raise RefusedError(
            f"target '{target.name}' is a server (databases: all): back up one of its databases "
            "at a time",
            hint="name the database (`backup-pipelines backup TARGET --database NAME`), or run "
            "`backup-pipelines backup TARGET` to back up every database in turn",
        )
    if stage_factory is None:
        stage_factory = encryption_stage_factory(settings.encryption)
    info = ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}' ({settings.dsn_env})")
    ensure_target_dirs(target, log=log)
    with target_lock(target.backup_dir), connect(info) as conn:
        remove_stale_work_folders(target.backup_dir, log=log)
        started = datetime.now(UTC)
        clock = time.monotonic()
        with conn.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute(
                "SELECT pg_export_snapshot(), current_setting('server_version'), "
                "pg_encoding_to_char(d.encoding), d.datcollate, d.datctype "
                "FROM pg_database d WHERE d.datname = current_database()"
            )
            row = cur.fetchone()
            assert row is not None
        snapshot, server_version, encoding, collate, ctype = row
        version_num = conn.info.server_version
        tools = find_tools(server_major(version_num), settings.pg_bin_dir)
        source = DumpSource(
            info, tools, server_version, version_num, snapshot, encoding, collate, ctype
        )
        extension = backup_extension(
            settings.format, settings.compression, encrypted=stage_factory is not None
        )
        final = _final_path(target.backup_dir, info.dbname, started, extension)
        log.info(f"Backing up {info.describe()} (PostgreSQL {server_version}) to {final}")
        # The server's globals join the set; they are removed again if the dump fails.
        captured = capture_globals(target, info, tools, final, stage_factory=stage_factory, log=log)

        counter: Any
        if settings.format == "directory":
            python = python_encoding(encoding)
            counter = DirectoryRowCounter(python) if python is not None else None
        else:
            plain_stream = settings.format == "plain" or _pg_dump_compression(target) == 0
            counter = stream_counter(settings.format, not plain_stream, encoding)
        if counter is None:
            # pg_dump compressed its data: the rows cannot be seen in the stream, so they are
            # counted in the dump's snapshot beside it (a second scan of the source).
            scan = _SnapshotScan(target, info, snapshot)
            scan.start()
            row_counts = scan.result
        else:

            def row_counts() -> dict[str, int]:
                # The tables whose rows the dump holds, in the dump's own snapshot.
                counted = reconcile_counts(counter.result(), tables_with_data(conn))
                if counted is not None:
                    return counted
                log.warning(
                    "the row counts could not be read from the dump stream; counting the rows "
                    "in the dump's snapshot instead"
                )
                scan = _SnapshotScan(target, info, snapshot)
                scan.run()
                return scan.result()

        try:
            artifact = _dump_to_file(
                purpose,
                target,
                source,
                final,
                started,
                clock,
                log,
                reporter_for(progress, log),
                stage_factory,
                None
                if counter is None or isinstance(counter, DirectoryRowCounter)
                else counter.feed,
                row_counts,
                captured,
                counter if isinstance(counter, DirectoryRowCounter) else None,
            )
        except BaseException:
            captured.discard()
            raise
        finally:
            if counter is None:
                scan.join()
            with contextlib.suppress(Exception):
                conn.rollback()
    return artifact


def _dump_to_file(
    purpose: str,
    target: Target,
    source: DumpSource,
    final: Path,
    started: datetime,
    clock: float,
    log: Any,
    progress: ProgressReporter,
    stage_factory: Any,
    observe: Callable[[bytes], None] | None,
    row_counts: Callable[[], dict[str, int]],
    globals_set: CapturedGlobals | None = None,
    directory_counter: DirectoryRowCounter | None = None,
) -> BackupArtifact:
    settings = target.settings
    tmp = partial_path(final)
    sidecars = [final.with_name(final.name + ".sha256"), final.with_name(final.name + ".meta")]
    proc: subprocess.Popen[bytes] | None = None
    abort_stored: Any = None
    writing = "the data file"
    folder = work_folder(target.backup_dir, final) if settings.format == "directory" else None
    try:
        if folder is not None:
            # pg_dump -j writes its folder first (its workers each write their own files);
            # only a complete folder is then streamed as a tar into the backup file.
            proc, stderr = spawn(
                _pg_dump_argv(source.tools, target, source.snapshot, folder),
                env=source.info.child_env(),
                stdout=subprocess.DEVNULL,
            )
            returncode = wait_for_dump_folder(
                proc, folder, progress, settings.dump_jobs, directory_counter
            )
            if returncode != 0:
                raise _pg_dump_failure(target, source, returncode, stderr.text())
        else:
            # pg_dump starts first: its connection and catalog reads overlap with setting up
            # the file and the encryption/compression stages (its output waits in the pipe).
            proc, stderr = spawn(
                _pg_dump_argv(source.tools, target, source.snapshot),
                env=source.info.child_env(),
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            _grow_pipe(proc.stdout)
        handle = open_private(tmp)
        with handle:
            sink = HashingSink(handle)
            if stage_factory is not None:
                write_stored, finish_stored, encryption_meta, *cleanup = stage_factory(sink)
                abort_stored = cleanup[0] if cleanup else None
            else:
                write_stored, finish_stored, encryption_meta = (
                    sink.write,
                    (lambda: None),
                    {"mode": "none"},
                )
            outer = outer_codec(settings.format, settings.compression)
            codec = compressor(
                outer, settings.effective_compression_level, threads=settings.dump_jobs
            )
            dump_bytes = 0
            compress = codec.compress
            if folder is not None:

                def write_tar(block: bytes) -> None:
                    write_stored(compress(block))

                with progress.start("tar", folder_size(folder)) as meter:
                    dump_bytes = write_directory_tar(
                        folder, write_tar, directory_counter, meter.advance
                    )
                    write_stored(codec.flush())
            else:
                assert proc.stdout is not None
                with progress.start("pg_dump") as meter:
                    for chunk in prefetched_chunks(proc.stdout, observe):
                        dump_bytes += len(chunk)
                        write_stored(compress(chunk))
                        meter.advance(len(chunk))
                    write_stored(codec.flush())
                    returncode = proc.wait()
                    if returncode != 0:
                        raise _pg_dump_failure(target, source, returncode, stderr.text())
            warnings = stderr.text()
            if warnings:
                log.warning(f"pg_dump said: {source.info.redact(warnings)}")
            finish_stored()
            handle.flush()
            os.fsync(handle.fileno())

        counts = row_counts()
        finished = datetime.now(UTC)
        meta = BackupMeta(
            tool_version=TOOL_VERSION,
            purpose=purpose,
            target=target.name,
            database=source.info.dbname,
            server=source.info.describe(),
            server_version=source.server_version,
            server_version_num=source.server_version_num,
            pg_dump_version=source.tools.version_string("pg_dump"),
            format=settings.format,
            compression=settings.compression,
            compression_level=settings.effective_compression_level,
            encryption=encryption_meta,
            file_name=final.name,
            size_bytes=sink.size,
            dump_bytes=dump_bytes,
            sha256=sink.digest.hexdigest(),
            started_at=started,
            finished_at=finished,
            duration_seconds=round(time.monotonic() - clock, 3),
            snapshot=source.snapshot,
            row_counts=counts,
            database_encoding=source.encoding,
            database_collate=source.collate,
            database_ctype=source.ctype,
            row_counts_scope="own",
            globals=globals_set.entry if globals_set is not None else None,
        )
        writing = "the .sha256 file"
        write_atomic(sidecars[0], sha256_line(meta.sha256, final.name).encode())
        writing = "the .meta file"
        write_meta(sidecars[1], meta)
        if globals_set is not None:
            writing = "the globals .sha256 file"
            globals_set.commit()
        # The rename is the commit point: before it there is no backup, after it a complete one.
        os.replace(tmp, final)
        fsync_dir(final.parent)
        log.info(
            f"Backup complete: {final.name}, {meta.size_bytes} bytes "
            f"(dump {meta.dump_bytes} bytes), {len(counts)} tables, {meta.total_rows} rows, "
            f"{meta.duration_seconds:.1f}s"
        )
        return BackupArtifact(final, meta)
    except BaseException as exc:
        raise discard_failed_backup(
            exc,
            what=f"{writing} of the backup of '{target.name}'",
            folder=final.parent,
            proc=proc,
            aborts=[abort_stored] if abort_stored is not None else [],
            leftovers=[tmp, *sidecars],
        ) from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
