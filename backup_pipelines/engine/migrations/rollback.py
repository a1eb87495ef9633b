"""Running a planned rollback: confirm, take a safety backup through the normal backup engine,
then run the down migrations newest first and delete their rows, all in one transaction, and
verify the tracking table ends where it should."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.confirm import require_confirmation
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.migrations.errors import (
    RollbackFailedError,
    RollbackRefusedError,
    db_error_text,
)
from backup_pipelines.engine.migrations.journal import AppliedMigration, read_applied
from backup_pipelines.engine.migrations.plan import (
    HistoryEntry,
    RollbackPlan,
    RollbackStep,
    target_connection,
)
from backup_pipelines.engine.postgres import connect

logger = logging.getLogger("backup_pipelines")


@dataclass
class RollbackResult:
    """A completed rollback."""

    plan: RollbackPlan
    backup: BackupArtifact
    after: list[HistoryEntry]
    duration_seconds: float

    @property
    def rolled_back(self) -> list[str]:
        return [step.tag for step in self.plan.steps]

    def summary(self) -> str:
        lines = [
            f"Rolled back {len(self.rolled_back)} migration(s) of '{self.plan.target}' "
            f"({self.plan.database}) in {self.duration_seconds:.1f}s:",
            *(f"  - {tag}" for tag in self.rolled_back),
            f"  before: {len(self.plan.applied)} applied, last {self.plan.last_before}",
            f"  after:  {len(self.after)} applied, last "
            f"{self.after[-1].label() if self.after else '(none)'} (verified)",
            f"  safety backup: {self.backup.path}",
        ]
        return "\n".join(lines)


def _same_rows(expected: Sequence[HistoryEntry], actual: Sequence[AppliedMigration]) -> bool:
    return [(e.id, e.created_at) for e in expected] == [(a.id, a.created_at) for a in actual]


def _undo_in_one_transaction(
    conn: psycopg.Connection,
    info: ConnectionInfo,
    plan: RollbackPlan,
    lock_timeout_ms: int,
    backup_path: Path,
    log: Any,
) -> None:
    """Lock the table, re-check the plan, run every down migration, delete the rows, commit."""
    table = plan.table
    unchanged = f"the database is unchanged; safety backup: {backup_path}"
    current_step: RollbackStep | None = None
    current_statement = (0, 0)
    try:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout_ms)))
        # Keep drizzle's migrator (and any other rollback) out until we commit.
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table.identifier))
        if not _same_rows(plan.applied, read_applied(conn, table)):
            raise RollbackRefusedError(
                f"{table} changed since the rollback was planned (a migration ran meanwhile); "
                f"nothing was rolled back; safety backup: {backup_path}",
                hint="run the rollback again (with --dry-run first) to see the new plan",
            )
        for step in plan.steps:
            current_step = step
            statements = step.migration.down_statements()
            log.info(f"Rolling back {step.tag} ({len(statements)} statement(s))")
            for number, statement in enumerate(statements, 1):
                current_statement = (number, len(statements))
                conn.execute(statement)  # no parameters: simple protocol, may hold several
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
                    raise RollbackFailedError(
                        f"{step.tag}: statement {number} of {step.migration.down_path.name} ended "
                        "the transaction; the rollback is no longer atomic and may be partly "
                        f"applied. Safety backup: {backup_path}",
                        hint="restore the safety backup, remove transaction control from the "
                        "down file, and run the rollback again",
                        safety_backup=backup_path,
                        failed_migration=step.tag,
                    )
            current_step = None
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE id = %s").format(table.identifier),
                (step.applied.id,),
            )
        if not _same_rows(plan.expected_after, read_applied(conn, table)):
            raise RollbackFailedError(
                f"after the down migrations {table} does not end at "
                f"{plan.last_after or '(empty)'}; the whole rollback was undone: {unchanged}",
                hint="a down migration probably writes to the tracking table; fix it and retry",
                safety_backup=backup_path,
            )
    except psycopg.Error as exc:
        conn.rollback()
        if current_step is not None:
            number, total = current_statement
            raise RollbackFailedError(
                f"down migration {current_step.tag} failed at statement {number} of {total} "
                f"({current_step.migration.down_path.name}): {db_error_text(exc, info)}. "
                f"The whole rollback was undone: {unchanged}",
                hint=f"fix {current_step.migration.down_path} and run the rollback again "
                "(try --dry-run first); to go back further, restore the safety backup",
                safety_backup=backup_path,
                failed_migration=current_step.tag,
            ) from None
        hint = (
            "another migration or rollback holds a lock on the table; retry when it has finished"
            if isinstance(exc, psycopg.errors.LockNotAvailable)
            else "check the database error above and retry"
        )
        raise RollbackFailedError(
            f"the rollback failed: {db_error_text(exc, info)}; {unchanged}",
            hint=hint,
            safety_backup=backup_path,
        ) from None
    try:
        conn.commit()
    except psycopg.Error as exc:
        raise RollbackFailedError(
            f"committing the rollback failed: {db_error_text(exc, info)}; the outcome is "
            f"unknown if the connection broke. Safety backup: {backup_path}",
            hint=f"check {table} and the schema; rerun with --dry-run to see where it stands",
            safety_backup=backup_path,
        ) from None


def execute_rollback(
    target: Target,
    plan: RollbackPlan,
    *,
    confirm: str | None,
    prompt: Callable[[str], str] | None = None,
    log: Any = None,
) -> RollbackResult:
    """Confirm, back up, undo the planned migrations in one transaction, verify."""
    log = log or logger
    tags = ", ".join(step.tag for step in plan.steps)
    require_confirmation(
        target.name,
        confirm,
        action=f"roll back {len(plan.steps)} migration(s) of '{target.name}' "
        f"({plan.database}): {tags}",
        prompt=prompt,
    )
    started = time.monotonic()
    backup = run_backup(target, purpose="pre-rollback", log=log)
    log.info(f"Safety backup before the rollback: {backup.path}")

    info = target_connection(target)
    table = plan.table
    settings = target.settings.migrations
    lock_timeout_ms = int((settings.lock_timeout_seconds if settings else 30) * 1000)
    with connect(info) as conn:
        try:
            _undo_in_one_transaction(conn, info, plan, lock_timeout_ms, backup.path, log)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    with connect(info) as conn:
        final = read_applied(conn, table)
    if not _same_rows(plan.expected_after, final):
        raise RollbackFailedError(
            f"the rollback was committed but {table} does not end at "
            f"{plan.last_after or '(empty)'} (another process changed it since?)",
            hint=f"inspect {table}; the safety backup is {backup.path}",
            safety_backup=backup.path,
        )
    by_id = {entry.id: entry for entry in plan.applied}
    result = RollbackResult(
        plan=plan,
        backup=backup,
        after=[by_id[row.id] for row in final],
        duration_seconds=round(time.monotonic() - started, 3),
    )
    log.info(result.summary())
    return result
