"""Restoring a backup into a database, and the restore test that proves a backup.

A plain-SQL restore runs ``psql -v ON_ERROR_STOP=1 --single-transaction`` (psql otherwise
exits 0 after failed statements); a custom-format restore runs ``pg_restore --exit-on-error``
in parallel. Restores always go into a *new* database, so a failure never touches another one.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import BackupPipelinesError, RestoreFailedError
from backup_pipelines.engine.fsutil import ensure_private_dir, open_private
from backup_pipelines.engine.postgres import (
    ConnectionInfo,
    PgTools,
    connect,
    find_tools,
    server_major,
    table_row_counts,
)
from backup_pipelines.engine.processes import spawn, stop
from backup_pipelines.engine.reader import dump_chunks, outer_codec

PROGRESS_EVERY_BYTES = 256 << 20


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
        lines = [
            f"{table}: expected {m['expected']}, restored {m['restored']}"
            for table, m in sorted(self.mismatches.items())
        ]
        return "restore test FAILED, row counts differ:\n  " + "\n  ".join(lines)


def compare_counts(
    expected: dict[str, int], restored: dict[str, int]
) -> dict[str, dict[str, int | None]]:
    mismatches: dict[str, dict[str, int | None]] = {}
    for table in sorted(set(expected) | set(restored)):
        if expected.get(table) != restored.get(table):
            mismatches[table] = {"expected": expected.get(table), "restored": restored.get(table)}
    return mismatches


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


@contextlib.contextmanager
def _dump_file_for_pg_restore(artifact: BackupArtifact, work_dir: Path) -> Iterator[Path]:
    """pg_restore -j needs a seekable file: use the backup itself when it is a bare custom archive."""
    if (
        outer_codec(artifact.meta.format, artifact.meta.compression) == "none"
        and artifact.meta.encryption.get("mode", "none") == "none"
    ):
        yield artifact.path
        return
    ensure_private_dir(work_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix="restore-", dir=work_dir))
    try:
        path = tmp_dir / "archive.dump"
        with open_private(path) as handle:
            for chunk in dump_chunks(artifact):
                handle.write(chunk)
        yield path
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def restore_into(
    artifact: BackupArtifact,
    database: ConnectionInfo,
    *,
    tools: PgTools,
    jobs: int = 2,
    work_dir: Path,
    log: Any,
) -> None:
    """Load ``artifact`` into the existing, empty database ``database``. Raises on any error."""
    env = database.child_env()
    if artifact.meta.format == "custom":
        with _dump_file_for_pg_restore(artifact, work_dir) as archive:
            argv = [
                tools.path("pg_restore"),
                "--no-password",
                "--exit-on-error",
                f"--jobs={jobs}",
                f"--dbname={database.dbname}",
                str(archive),
            ]
            log.info(
                f"Restoring {artifact.path.name} with pg_restore -j {jobs} into {database.describe()}"
            )
            proc, stderr = spawn(argv, env=env, stdout=subprocess.DEVNULL)
            if proc.wait() != 0:
                raise RestoreFailedError(
                    f"pg_restore failed restoring {artifact.path.name} into {database.describe()}: "
                    f"{database.redact(stderr.text())}"
                )
        return
    argv = [
        tools.path("psql"),
        "--no-password",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        f"--dbname={database.dbname}",
    ]
    log.info(
        f"Restoring {artifact.path.name} with psql --single-transaction into {database.describe()}"
    )
    proc, stderr = spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    done = 0
    next_report = PROGRESS_EVERY_BYTES
    total = artifact.meta.dump_bytes or 1
    try:
        for chunk in dump_chunks(artifact):
            proc.stdin.write(chunk)
            done += len(chunk)
            if done >= next_report:
                log.info(
                    f"Restore progress: {done >> 20} MiB of {total >> 20} MiB ({100 * done / total:.0f}%)"
                )
                next_report += PROGRESS_EVERY_BYTES
        proc.stdin.close()
    except BrokenPipeError:
        pass  # psql stopped reading: its exit status and stderr say why
    except BaseException:
        stop(proc)
        raise
    if proc.wait() != 0:
        raise RestoreFailedError(
            f"psql failed restoring {artifact.path.name} into {database.describe()} "
            f"(nothing was committed): {database.redact(stderr.text())}"
        )


def restore_test(target: Target, artifact: BackupArtifact, *, log: Any) -> RestoreTestResult:
    """Restore into a scratch database, compare every table's row count with ``.meta``, drop it."""
    admin = ConnectionInfo.parse(
        target.scratch_dsn(), source=f"target '{target.name}' scratch server"
    )
    with connect(admin) as conn:
        major = server_major(conn.info.server_version)
    tools = find_tools(major, target.settings.pg_bin_dir)
    name = scratch_name("bp_test", target.name)
    scratch = admin.with_dbname(name)
    started = time.monotonic()
    create_database(admin, name, artifact)
    try:
        try:
            restore_into(
                artifact,
                scratch,
                tools=tools,
                jobs=target.settings.restore_jobs,
                work_dir=target.backup_dir.parent / ".work",
                log=log,
            )
        except BackupPipelinesError as exc:
            raise RestoreFailedError(
                f"restore test of {artifact.path.name} failed: {exc.message}",
                hint="the backup cannot be restored as is; keep the previous backups and investigate",
            ) from None
        with connect(scratch) as conn:
            restored = table_row_counts(conn)
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
