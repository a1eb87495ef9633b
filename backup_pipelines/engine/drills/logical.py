"""Restore drills: prove the newest backup restores, and measure how long it takes.

A drill restores the newest backup of a target into a scratch database (on the drill server
when ``scratch_dsn_env`` is configured, else beside the target's database under a throwaway
name), compares every table's row count with the backup's ``.meta``, runs amcheck's
``bt_index_check`` on every restored btree index, and drops the scratch database again. The
target's own database is never touched.

The measured RTO covers what a real restore would do: verify the backup, create the database,
load it and check the counts. The RPO at that moment is the age of the backup drilled.

The restore test of ``backup --test`` (:func:`restore_test`) is the same proof for one backup just
taken: restore into a scratch database, compare the row counts, drop it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.globals import apply_database_properties, read_globals_sql
from backup_pipelines.engine.clock import age_seconds
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.databases import require_database
from backup_pipelines.engine.drills.amcheck import AmcheckOutcome, run_amcheck
from backup_pipelines.engine.drills.fresh_server import (
    FRESH_SERVER,
    SAME_SERVER,
    ThrowawayCluster,
    choose_drill_mode,
    throwaway_cluster,
)
from backup_pipelines.engine.errors import BackupPipelinesError, RestoreFailedError
from backup_pipelines.engine.postgres import connect, server_major, table_row_counts
from backup_pipelines.engine.progress import (
    DEFAULT_PROGRESS_INTERVAL_SECONDS,
    ProgressReporter,
    reporter_for,
)
from backup_pipelines.engine.restore.cleanup import drop_leftover_databases, work_dir_for
from backup_pipelines.engine.restore.database import (
    SCRATCH_MARKER,
    create_database,
    drop_database,
    mark_database,
    scratch_name,
    server_tools,
)
from backup_pipelines.engine.restore.locate import (
    configured_offsite_storage,
    latest_local_backup,
    latest_offsite_backup,
    local_copy,
    locate_backup,
)
from backup_pipelines.engine.restore.roles import create_missing_roles, tablespaces_defined
from backup_pipelines.engine.restore.runner import compare_counts, describe_mismatches, restore_into
from backup_pipelines.engine.storage import load_remote_artifact
from backup_pipelines.engine.verify import verify_artifact

logger = logging.getLogger("backup_pipelines")


@dataclass
class DrillResult:
    """The outcome of one drill. Failures are results, not exceptions: they are what a drill finds."""

    target: str
    passed: bool
    started_at: datetime
    failed_step: str | None = None
    reason: str | None = None
    backup: str | None = None
    source: str = "none"
    backup_taken_at: datetime | None = None
    backup_age_seconds: float | None = None
    rto_seconds: float | None = None
    verify_seconds: float | None = None
    restore_seconds: float | None = None
    tables: int = 0
    rows: int = 0
    mismatches: dict[str, dict[str, int | None]] = field(default_factory=dict)
    amcheck: AmcheckOutcome | None = None
    scratch_server: str | None = None
    scratch_database: str | None = None
    scratch_dropped: bool = False
    # fresh_server: a throwaway cluster initialised for the drill got the backup's globals
    # first; same_server: a scratch database on the drill (or the target's) server.
    mode: str = SAME_SERVER
    roles_created: int = 0

    def summary(self) -> str:
        if self.passed:
            assert self.rto_seconds is not None and self.backup_age_seconds is not None
            return (
                f"restore drill passed ({self.mode}): {Path(self.backup or '').name} "
                f"({self.source}) restored in "
                f"{self.rto_seconds:.1f}s, {self.tables} tables / {self.rows} rows match, "
                f"{self.amcheck.detail if self.amcheck else 'amcheck not run'}; "
                f"backup age {self.backup_age_seconds / 3600:.1f} h"
            )
        return f"restore drill FAILED at step '{self.failed_step}' ({self.mode}): {self.reason}"


def drill_backup(target: Target, *, log: Any = None) -> tuple[BackupArtifact, str] | None:
    """The backup a drill restores and where it comes from (``s3`` or ``local``).

    The newest backup, read from its offsite copy when one exists (that is the copy a disaster
    would leave), else from local disk. When S3 cannot be reached the drill uses the local
    file and says so in the log.
    """
    log = log or logger
    local = latest_local_backup(target)
    storage = configured_offsite_storage(target)
    if storage is not None:
        try:
            if local is not None:
                if storage.exists(local.path.name):
                    return load_remote_artifact(storage, local.path.name), "s3"
            else:
                remote = latest_offsite_backup(target)
                if remote is not None:
                    return remote, "s3"
        except BackupPipelinesError as exc:
            log.warning(f"offsite copies cannot be read ({exc.message}); drilling the local backup")
    return (local, "local") if local is not None else None


def run_drill(
    config: ProjectConfig,
    target_name: str,
    *,
    log: Any = None,
    backup: str | None = None,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
    progress: ProgressReporter | None = None,
    database: str | None = None,
    fresh_server: bool | None = None,
) -> DrillResult:
    """Drill ``backup`` (default: the newest backup) of a target. Never touches the target's database.

    ``database``: which database of a server target (``databases: all``); required for one.
    ``fresh_server`` (None: the target's ``restore.drill.fresh_server``) restores onto a
    throwaway cluster initialised for the drill, after creating the roles from the backup's
    globals: proof that the backup set alone restores the database.

    Raises only for configuration errors (unknown target); everything a drill can find wrong
    with a backup or the drill server comes back as a failed :class:`DrillResult`.
    """
    log = log or logger
    progress = reporter_for(progress, log, progress_interval)
    target = require_database(config.target(target_name), database, "drill")
    result = DrillResult(target=target.name, passed=False, started_at=datetime.now(UTC))

    def failed(step: str, reason: str) -> DrillResult:
        result.failed_step, result.reason = step, reason
        log.error(f"Restore drill of '{target.name}' failed at step '{step}': {reason}")
        return result

    try:
        if backup is None:
            found = drill_backup(target, log=log)
            if found is None:
                return failed(
                    "locate",
                    f"target '{target.name}' has no usable backup in {target.backup_dir}: "
                    "materialize its logical_backup first",
                )
            artifact, result.source = found
        else:
            artifact = locate_backup(config, target, backup)
            result.source = "local" if artifact.is_local else "s3"
    except BackupPipelinesError as exc:
        return failed("locate", exc.message)
    major = server_major(artifact.meta.server_version_num)
    try:
        result.mode, fresh_bin_dir, why_not = choose_drill_mode(target, major, fresh_server)
    except BackupPipelinesError as exc:
        result.mode = FRESH_SERVER
        return failed("fresh_server", f"{exc.message}; {exc.hint}" if exc.hint else exc.message)
    admin: ConnectionInfo | None = None
    if result.mode == SAME_SERVER:
        try:
            admin = ConnectionInfo.parse(
                target.scratch_dsn(), source=f"target '{target.name}' drill server"
            )
        except BackupPipelinesError as exc:
            return failed("locate", exc.message)
    result.backup = artifact.location
    result.backup_taken_at = artifact.meta.started_at
    result.backup_age_seconds = round(age_seconds(artifact.meta.started_at, result.started_at), 1)
    if admin is not None:
        result.scratch_server = admin.describe().rsplit("/", 1)[0]
        if target.settings.restore.drill.fresh_server is not False and fresh_server is None:
            log.info(f"Restore drill on the same server, not a fresh one: {why_not}")
    else:
        result.scratch_server = f"a throwaway PostgreSQL {major} cluster"
    log.info(
        f"Restore drill of '{target.name}' ({result.mode}): {artifact.location} ({result.source}, "
        f"taken {artifact.meta.started_at.isoformat()}) into a scratch database on "
        f"{result.scratch_server}"
    )

    clock = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        if not artifact.is_local:
            # Downloaded once and restored from disk; the download counts towards the RTO.
            try:
                artifact = cleanup.enter_context(
                    local_copy(artifact, work_dir_for(target), log=log, progress=progress)
                )
            except BackupPipelinesError as exc:
                return failed("download", exc.message)
        return _verify_restore_check(
            result,
            target,
            admin,
            artifact,
            clock,
            failed,
            log=log,
            progress=progress,
            fresh_bin_dir=fresh_bin_dir,
            stack=cleanup,
        )


def _verify_restore_check(
    result: DrillResult,
    target: Target,
    admin: ConnectionInfo | None,
    artifact: BackupArtifact,
    clock: float,
    failed: Callable[[str, str], DrillResult],
    *,
    log: Any,
    progress: ProgressReporter,
    fresh_bin_dir: Path | None = None,
    stack: contextlib.ExitStack,
) -> DrillResult:
    try:
        outcomes = verify_artifact(artifact)
    except BackupPipelinesError as exc:
        return failed("verify", exc.message)
    broken = [o for o in outcomes if not o.passed]
    if broken:
        return failed("verify", broken[0].message)
    result.verify_seconds = round(time.monotonic() - clock, 3)
    if admin is None:
        assert fresh_bin_dir is not None
        try:
            cluster = stack.enter_context(throwaway_cluster(fresh_bin_dir, target, log=log))
        except (BackupPipelinesError, psycopg.Error) as exc:
            return failed("fresh_server", _message(exc))
        admin = cluster.admin
        try:
            result.roles_created = _apply_globals(cluster, artifact, log=log)
        except (BackupPipelinesError, psycopg.Error) as exc:
            return failed("globals", _message(exc))

    name = scratch_name("bp_drill", target.name)
    result.scratch_database = name
    try:
        drop_leftover_databases(admin, target, SCRATCH_MARKER, log=log)
        tools = server_tools(admin, target)
        create_database(admin, name, artifact)
        mark_database(admin, name, SCRATCH_MARKER, target)
    except (BackupPipelinesError, psycopg.Error) as exc:
        message = exc.message if isinstance(exc, BackupPipelinesError) else admin.redact(str(exc))
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            # Backups from a standby are fine; a scratch database cannot be made on one.
            message += (
                "; the drill server is a read-only standby: give the target a writable drill "
                "server (scratch_dsn_env) or use the fresh-server drill "
                "(restore.drill.fresh_server)"
            )
        return failed("create_scratch_database", message)
    try:
        restore_clock = time.monotonic()
        try:
            restore_into(
                artifact,
                admin.with_dbname(name),
                tools=tools,
                jobs=target.settings.restore_jobs,
                work_dir=work_dir_for(target),
                log=log,
                progress=progress,
            )
            if result.mode == FRESH_SERVER:
                _apply_database_properties(admin, name, artifact)
        except (BackupPipelinesError, psycopg.Error) as exc:
            if isinstance(exc, psycopg.Error):
                return failed("restore", _message(exc))
            return failed("restore", f"{exc.message}; {exc.hint}" if exc.hint else exc.message)
        result.restore_seconds = round(time.monotonic() - restore_clock, 3)
        try:
            with connect(admin.with_dbname(name), autocommit=True) as conn:
                restored = table_row_counts(
                    conn, with_children=artifact.meta.row_counts_with_children
                )
                result.rto_seconds = round(time.monotonic() - clock, 3)
                result.tables, result.rows = len(restored), sum(restored.values())
                result.mismatches = compare_counts(artifact.meta.row_counts, restored)
                if result.mismatches:
                    return failed(
                        "check",
                        "row counts differ from the backup's .meta: "
                        + describe_mismatches(result.mismatches),
                    )
                result.amcheck = run_amcheck(conn)
        except (BackupPipelinesError, psycopg.Error) as exc:
            message = (
                exc.message if isinstance(exc, BackupPipelinesError) else admin.redact(str(exc))
            )
            return failed("check", message)
        if result.amcheck.failures:
            return failed("amcheck", result.amcheck.detail)
        if not result.amcheck.available:
            log.warning(result.amcheck.detail)
        result.passed = True
        log.info(result.summary())
        return result
    finally:
        try:
            drop_database(admin, name)
            result.scratch_dropped = True
        except (BackupPipelinesError, psycopg.Error) as exc:
            message = (
                exc.message if isinstance(exc, BackupPipelinesError) else admin.redact(str(exc))
            )
            problem = f"could not drop the scratch database {name}: {message}"
            if result.passed:
                result.passed = False
                failed("cleanup", problem)
            else:
                log.error(problem)


def _message(exc: BaseException) -> str:
    if isinstance(exc, BackupPipelinesError):
        return exc.message
    return " ".join(str(exc).split())


def _apply_globals(cluster: ThrowawayCluster, artifact: BackupArtifact, *, log: Any) -> int:
    """The backup's tablespaces (as folders of the fresh cluster), roles, memberships and
    role settings onto the fresh cluster."""
    entry = artifact.meta.globals
    if entry is None:
        log.warning(
            f"{Path(artifact.location).name} was taken before backups captured the server's "
            "globals: no roles to create, the restore needs the roles it references"
        )
        return 0
    text = read_globals_sql(artifact)
    cluster.create_tablespaces(tablespaces_defined(text), log=log)
    with connect(cluster.admin, autocommit=True) as conn:
        report = create_missing_roles(conn, text, log=log)
    if not entry.role_passwords:
        log.warning(
            f"The drilled backup's globals lack role passwords: {entry.role_passwords_reason}"
        )
    return len(report.created)


def _apply_database_properties(admin: ConnectionInfo, name: str, artifact: BackupArtifact) -> None:
    """The owner, privileges and settings the backup recorded, onto the scratch database."""
    entry = artifact.meta.globals
    if entry is not None and entry.database is not None:
        with connect(admin, autocommit=True) as conn:
            apply_database_properties(conn, name, entry.database)


# --- the restore test of `backup --test` --------------------------------------------------------


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


def restore_test(
    target: Target,
    artifact: BackupArtifact,
    *,
    log: Any,
    progress: ProgressReporter | None = None,
) -> RestoreTestResult:
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
                progress=progress,
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
