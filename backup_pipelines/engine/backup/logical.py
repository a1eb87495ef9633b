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
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

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
from backup_pipelines.engine.backup.pg_dump import (
    DumpSource,
    SnapshotScan,
    exported_snapshot,
    pg_dump_argv,
    pg_dump_compression,
    pg_dump_failure,
    tables_in_snapshot,
)
from backup_pipelines.engine.compression import CHUNK_SIZE, compressor
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.encryption import encryption_stage_factory
from backup_pipelines.engine.errors import RefusedError
from backup_pipelines.engine.fsutil import fsync_dir, open_private, partial_path, write_atomic
from backup_pipelines.engine.postgres import find_tools, server_major
from backup_pipelines.engine.processes import spawn
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
    psql = find_tools(None, settings.pg_bin_dir).path("psql")
    with target_lock(target.backup_dir), exported_snapshot(info, psql) as exported:
        remove_stale_work_folders(target.backup_dir, log=log)
        started = datetime.now(UTC)
        clock = time.monotonic()
        tools = find_tools(server_major(exported.server_version_num), settings.pg_bin_dir)
        source = DumpSource(
            info,
            tools,
            exported.server_version,
            exported.server_version_num,
            exported.snapshot,
            exported.encoding,
            exported.collate,
            exported.ctype,
        )
        extension = backup_extension(
            settings.format, settings.compression, encrypted=stage_factory is not None
        )
        final = _final_path(target.backup_dir, info.dbname, started, extension)
        log.info(f"Backing up {info.describe()} (PostgreSQL {exported.server_version}) to {final}")
        counter: Any
        if settings.format == "directory":
            python = python_encoding(exported.encoding)
            counter = DirectoryRowCounter(python) if python is not None else None
        else:
            plain_stream = settings.format == "plain" or pg_dump_compression(target) == 0
            counter = stream_counter(settings.format, not plain_stream, exported.encoding)
        # Beside the dump, once pg_dump has started (it needs none of it): the server's globals
        # (a connection and pg_dumpall of their own, on another core), the tables the dump
        # holds, read in its snapshot, and pg_dump's version. The globals join the set when it
        # is committed and are removed if anything fails.
        background = ThreadPoolExecutor(2, thread_name_prefix="beside-pg_dump")
        beside: dict[str, Future[Any]] = {}
        if counter is None:
            # pg_dump compressed its data: the rows cannot be seen in the stream, so they are
            # counted in the dump's snapshot beside it (a second scan of the source).
            scan = SnapshotScan(target, info, exported.snapshot)
            row_counts = scan.result
        else:

            def row_counts() -> dict[str, int]:
                counted = reconcile_counts(counter.result(), beside["tables"].result())
                if counted is not None:
                    return counted
                log.warning(
                    "the row counts could not be read from the dump stream; counting the rows "
                    "in the dump's snapshot instead"
                )
                scan = SnapshotScan(target, info, exported.snapshot)
                scan.run()
                return scan.result()

        def started_pg_dump() -> None:
            beside["globals"] = background.submit(
                capture_globals, target, info, tools, final, stage_factory=stage_factory, log=log
            )
            if counter is None:
                scan.start()
            else:
                beside["tables"] = background.submit(tables_in_snapshot, info, exported.snapshot)
            background.submit(tools.version_string, "pg_dump")

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
                started_pg_dump,
                lambda: beside["globals"].result() if "globals" in beside else None,
                counter if isinstance(counter, DirectoryRowCounter) else None,
            )
        except BaseException:
            if "globals" in beside:
                with contextlib.suppress(BaseException):  # a failed capture removed its files
                    beside["globals"].result().discard()
            raise
        finally:
            background.shutdown(wait=True)
            if counter is None:
                scan.join()
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
    started_pg_dump: Callable[[], None],
    captured_globals: Callable[[], CapturedGlobals | None],
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
                pg_dump_argv(source.tools, target, source.snapshot, folder),
                env=source.info.child_env(),
                stdout=subprocess.DEVNULL,
            )
            started_pg_dump()
            returncode = wait_for_dump_folder(
                proc, folder, progress, settings.dump_jobs, directory_counter
            )
            if returncode != 0:
                raise pg_dump_failure(target, source, returncode, stderr.text())
        else:
            # pg_dump starts first: its connection and catalog reads overlap with setting up
            # the file and the encryption/compression stages (its output waits in the pipe).
            proc, stderr = spawn(
                pg_dump_argv(source.tools, target, source.snapshot),
                env=source.info.child_env(),
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            _grow_pipe(proc.stdout)
            started_pg_dump()
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
                        raise pg_dump_failure(target, source, returncode, stderr.text())
            warnings = stderr.text()
            if warnings:
                log.warning(f"pg_dump said: {source.info.redact(warnings)}")
            finish_stored()
            sink.commit()

        counts = row_counts()
        writing = "the globals file"
        globals_set = captured_globals()
        writing = "the .meta file"
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
