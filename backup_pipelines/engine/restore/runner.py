"""Loading a backup into an empty database: ``psql --single-transaction`` for plain SQL,
``pg_restore --exit-on-error -j`` for custom archives and directory-format dumps; and checking the row counts it holds."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.counting import python_encoding
from backup_pipelines.engine.backup.directory import read_dump_directory
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import RestoreFailedError
from backup_pipelines.engine.fsutil import ensure_private_dir, open_private
from backup_pipelines.engine.postgres import PgTools
from backup_pipelines.engine.processes import one_line, spawn, stop
from backup_pipelines.engine.progress import Progress, ProgressReporter, reporter_for
from backup_pipelines.engine.reader import dump_chunks, outer_codec
from backup_pipelines.engine.restore.cleanup import work_tmp_dir


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


def _is_bare_local_file(artifact: BackupArtifact) -> bool:
    return (
        artifact.is_local
        and outer_codec(artifact.meta.format, artifact.meta.compression) == "none"
        and artifact.meta.encryption.get("mode", "none") == "none"
    )


@contextlib.contextmanager
def _dump_file_for_pg_restore(
    artifact: BackupArtifact, work_dir: Path, progress: ProgressReporter
) -> Iterator[Path]:
    """pg_restore -j needs a seekable file: use the backup itself when it is a bare custom
    archive; a directory-format backup is extracted (checked, safely) into a folder."""
    if artifact.meta.format != "directory" and _is_bare_local_file(artifact):
        yield artifact.path
        return
    tmp_dir = work_tmp_dir(work_dir, "restore")
    try:
        if artifact.meta.format == "directory":
            folder = ensure_private_dir(tmp_dir / "dump")
            with progress.start("Extracting dump folder", artifact.meta.dump_bytes) as meter:
                read_dump_directory(
                    _metered(dump_chunks(artifact), meter),
                    name=artifact.path.name,
                    encoding=python_encoding(artifact.meta.database_encoding or "UTF8") or "utf-8",
                    extract_to=folder,
                    decode_data=False,
                )
            yield folder
            return
        path = tmp_dir / "archive.dump"
        with (
            progress.start("Decoding archive", artifact.meta.dump_bytes) as meter,
            open_private(path) as handle,
        ):
            for chunk in dump_chunks(artifact):
                handle.write(chunk)
                meter.advance(len(chunk))
        yield path
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _metered(chunks: Iterator[bytes], meter: Progress) -> Iterator[bytes]:
    for chunk in chunks:
        meter.advance(len(chunk))
        yield chunk


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
_MISSING_TABLESPACE = re.compile(r'[Tt]ablespace "((?:[^"]|"")+)" does not exist')


def restore_error_hint(error_text: str) -> str | None:
    """What to do about a restore error we recognise (None: the error speaks for itself)."""
    missing = _MISSING_ROLE.search(error_text)
    if missing:
        return (
            f"the backup's objects belong to roles this server does not have (role "
            f"{missing.group(1)!r}): `backup-pipelines restore` creates them from the backup's "
            "globals; for a backup taken before globals were captured create them here first, "
            "e.g. `pg_dumpall --roles-only` on the source server piped into psql on this one"
        )
    tablespace = _MISSING_TABLESPACE.search(error_text)
    if tablespace:
        name = tablespace.group(1)
        quoted = '"' + name.replace('"', '""') + '"'  # as SQL names it, whatever it holds
        return (
            f"the backup keeps objects in tablespace {name!r}, which this server does not "
            "have (a tablespace is a folder of the source server): create it here first, "
            f"`CREATE TABLESPACE {quoted} LOCATION '/an/empty/folder'` (a folder owned by the "
            "server's OS user), then run the restore again"
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
    progress: ProgressReporter | None = None,
) -> None:
    """Load ``artifact`` into the existing, empty database ``database``. Raises on any error.

    Progress (bytes of SQL fed to psql, or TOC items pg_restore finished) goes to ``progress``
    (default: lines in ``log``).
    """
    progress = reporter_for(progress, log)
    env = database.child_env()
    name = Path(artifact.location).name
    if artifact.meta.format in ("custom", "directory"):
        with _dump_file_for_pg_restore(artifact, work_dir, progress) as archive:
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
            with progress.start("pg_restore", _toc_entries(tools, archive), "items") as meter:
                proc = subprocess.Popen(
                    argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                assert proc.stderr is not None
                output = _PgRestoreOutput(proc.stderr, meter)
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
    with progress.start("psql", artifact.meta.dump_bytes) as meter:
        proc, stderr = spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert proc.stdin is not None
        try:
            for chunk in dump_chunks(artifact):
                proc.stdin.write(chunk)
                meter.advance(len(chunk))
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
