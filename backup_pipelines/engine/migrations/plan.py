"""Planning a rollback of the last N migrations: what will be undone, from what, and why it is
refused when it is unsafe. Changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.migrations.errors import (
    MigrationError,
    RollbackRefusedError,
    db_error_text,
)
from backup_pipelines.engine.migrations.journal import (
    DOWN_SUFFIX,
    JOURNAL,
    TRANSACTION_CONTROL,
    AppliedMigration,
    Migration,
    MigrationsFolder,
    TrackingTable,
    migrations_folder_of,
    read_applied,
    read_migration_text,
    split_statements,
)
from backup_pipelines.engine.postgres import connect


def _when_text(when: int | None) -> str:
    if when is None:
        return "unknown time"
    return datetime.fromtimestamp(when / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class RollbackStep:
    """One applied migration to undo, with the file that undoes it."""

    applied: AppliedMigration
    migration: Migration
    statements: int

    @property
    def tag(self) -> str:
        return self.migration.tag


@dataclass(frozen=True)
class HistoryEntry:
    """An applied row as people read it: its tag when the journal knows it."""

    id: int
    created_at: int | None
    tag: str | None

    def label(self) -> str:
        return self.tag or f"(row {self.id}, created_at {self.created_at}: not in the journal)"


@dataclass
class RollbackPlan:
    """What a rollback will do. Building it touches nothing."""

    target: str
    database: str
    table: TrackingTable
    folder: Path
    applied: list[HistoryEntry]
    steps: list[RollbackStep]  # newest first
    warnings: list[str] = field(default_factory=list)

    @property
    def expected_after(self) -> list[HistoryEntry]:
        return self.applied[: len(self.applied) - len(self.steps)]

    @property
    def last_before(self) -> str | None:
        return self.applied[-1].label() if self.applied else None

    @property
    def last_after(self) -> str | None:
        after = self.expected_after
        return after[-1].label() if after else None

    def describe(self) -> str:
        lines = [
            f"Rollback plan for target '{self.target}' ({self.database})",
            f"  migrations folder: {self.folder}",
            f"  tracking table: {self.table}, {len(self.applied)} applied, "
            f"last: {self.last_before or '(none)'}",
            f"  roll back {len(self.steps)} migration(s), newest first:",
        ]
        for number, step in enumerate(self.steps, 1):
            lines.append(
                f"    {number}. {step.tag} (row {step.applied.id}, generated "
                f"{_when_text(step.migration.when)}): {step.migration.down_path.name}, "
                f"{step.statements} statement(s)"
            )
        lines.append(f"  afterwards the table ends at: {self.last_after or '(empty)'}")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def build_plan(
    *,
    target: str,
    database: str,
    table: TrackingTable,
    folder: MigrationsFolder,
    applied: Sequence[AppliedMigration],
    steps: int,
) -> RollbackPlan:
    """Match the last ``steps`` applied rows to journal entries and files; refuse if unsafe."""
    history = []
    matched: dict[int, Migration] = {}
    warnings = []
    for row in applied:
        candidates = folder.by_when(row.created_at) if row.created_at is not None else []
        migration = next(
            (m for m in candidates if m.up_path.exists() and m.matches_hash(row.hash)), None
        )
        if migration is None and len(candidates) == 1:
            migration = candidates[0]
        if migration is not None:
            matched[row.id] = migration
        history.append(HistoryEntry(row.id, row.created_at, migration.tag if migration else None))

    if not applied:
        raise RollbackRefusedError(
            f"no migrations are applied in {database} ({table} is empty); nothing to roll back"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(applied):
        raise RollbackRefusedError(
            f"cannot roll back {steps} migration(s): {len(applied)} are applied in {database}",
            hint=f"give a number of steps between 1 and {len(applied)}",
        )

    problems = []
    plan_steps = []
    for row in reversed(applied[-steps:]):
        migration = matched.get(row.id)
        if migration is None:
            problems.append(
                f"applied row {row.id} (created_at {row.created_at}) matches no journal entry in "
                f"{folder.path / JOURNAL}: this folder is not the one the database was migrated from"
            )
            continue
        if not migration.up_path.exists():
            problems.append(f"{migration.tag}: migration file {migration.up_path} is missing")
            continue
        if not migration.matches_hash(row.hash):
            problems.append(
                f"{migration.tag}: {migration.up_path.name} was edited after it was applied "
                f"(recorded hash {row.hash[:12]}..., file hash {migration.hashes()[0][:12]}...); "
                "its down migration may not undo what actually ran"
            )
        if not migration.down_path.exists():
            problems.append(f"{migration.tag}: down migration {migration.down_path} is missing")
            continue
        down_text = read_migration_text(migration.down_path)
        control = TRANSACTION_CONTROL.search(down_text)
        if control:
            problems.append(
                f"{migration.tag}: {migration.down_path.name} contains "
                f"'{control.group(0).strip()}', which would break the single transaction"
            )
        statements = split_statements(down_text)
        if not statements:
            problems.append(f"{migration.tag}: {migration.down_path.name} has no statements")
        plan_steps.append(RollbackStep(row, migration, len(statements)))
    if problems:
        raise RollbackRefusedError(
            "refusing to roll back; nothing was touched:\n  - " + "\n  - ".join(problems),
            hint="restore the migration files from version control (the versions that were "
            f"applied) and add the missing {DOWN_SUFFIX} files, then try again with --dry-run",
        )
    for row in applied[:-steps]:
        migration = matched.get(row.id)
        if (
            migration is not None
            and migration.up_path.exists()
            and not migration.matches_hash(row.hash)
        ):
            warnings.append(f"{migration.tag} (not rolled back) was edited after it was applied")
    return RollbackPlan(
        target=target,
        database=database,
        table=table,
        folder=folder.path,
        applied=history,
        steps=plan_steps,
        warnings=warnings,
    )


def target_connection(target: Target) -> ConnectionInfo:
    return ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )


def plan_rollback(target: Target, steps: int) -> RollbackPlan:
    """Read the tracking table and the folder and work out the rollback. Changes nothing."""
    folder = migrations_folder_of(target)
    table = TrackingTable.of(target)
    info = target_connection(target)
    with connect(info) as conn:
        conn.read_only = True
        try:
            applied = read_applied(conn, table)
        except psycopg.Error as exc:
            raise MigrationError(
                f"cannot read {table} in {info.describe()}: {db_error_text(exc, info)}",
                hint="the target's role needs SELECT on the tracking table (and, to roll back, "
                "the privileges the down migrations need)",
            ) from None
        conn.rollback()
    return build_plan(
        target=target.name,
        database=info.describe(),
        table=table,
        folder=folder,
        applied=applied,
        steps=steps,
    )
