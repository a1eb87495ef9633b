"""Schema migrations in drizzle-kit's layout, and rolling the last N of them back safely.

drizzle-kit writes ``<folder>/NNNN_<tag>.sql`` plus ``<folder>/meta/_journal.json`` (entries with
``idx``, ``tag``, ``when``, ``breakpoints``); statements inside a file are separated by
``--> statement-breakpoint``. drizzle-orm's migrator records each applied file as one row of
``drizzle.__drizzle_migrations (id SERIAL PRIMARY KEY, hash text NOT NULL, created_at bigint)``:
``hash`` is the SHA-256 (hex) of the file's text, ``created_at`` the journal entry's ``when``.
It treats every journal entry whose ``when`` is newer than the newest ``created_at`` as pending
and applies all of them in one transaction.

Drizzle has no down migrations. Our convention: ``NNNN_<tag>.down.sql`` beside
``NNNN_<tag>.sql``, split on the same breakpoint marker, undoing exactly that migration (schema
and data), and safe inside a transaction (no ``CREATE INDEX CONCURRENTLY``, no ``COMMIT``).

A rollback: plan (refuse before touching anything if the plan is unsafe), confirm, take a
safety backup through the normal backup engine, then run the down migrations newest first and
delete their rows, all in one transaction, and verify the table ends where it should.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.confirm import require_confirmation
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError, RefusedError
from backup_pipelines.engine.postgres import ConnectionInfo, connect

logger = logging.getLogger("backup_pipelines")

BREAKPOINT = "--> statement-breakpoint"
JOURNAL = Path("meta") / "_journal.json"
UP_SUFFIX = ".sql"
DOWN_SUFFIX = ".down.sql"

# A whole statement that ends the transaction would break "all or nothing": refuse such files.
_TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION|ABORT)"
    r"(\s+(WORK|TRANSACTION|AND\s+(NO\s+)?CHAIN))*\s*;",
    re.IGNORECASE | re.MULTILINE,
)


class MigrationError(BackupPipelinesError):
    """A migrations folder or tracking table problem."""


class RollbackRefusedError(MigrationError, RefusedError):
    """The rollback was refused before anything was changed (bad input or an unsafe plan)."""


class RollbackFailedError(MigrationError):
    """The rollback ran but failed; its transaction was rolled back, so nothing changed."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        safety_backup: Path | None = None,
        failed_migration: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.safety_backup = safety_backup
        self.failed_migration = failed_migration


# --- the migrations folder ----------------------------------------------------------------------


def drizzle_hash(text: str) -> str:
    """The hash drizzle-orm records: SHA-256 hex of the file's text, CRLF normalised to LF."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def legacy_drizzle_hash(text: str) -> str:
    """What drizzle-orm releases before the CRLF normalisation recorded (the text as read)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_statements(text: str) -> list[str]:
    """Split a migration file the way drizzle-orm does, dropping pieces with nothing to run."""
    return [piece for piece in text.replace("\r\n", "\n").split(BREAKPOINT) if piece.strip()]


def _read_text(path: Path) -> str:
    # Node's Buffer.toString() decodes UTF-8 replacing invalid bytes; hash the same text.
    return path.read_bytes().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Migration:
    """One journal entry with its files."""

    idx: int
    tag: str
    when: int
    up_path: Path
    down_path: Path

    @property
    def up_sql(self) -> str:
        return _read_text(self.up_path)

    def hashes(self) -> tuple[str, str]:
        text = self.up_sql
        return drizzle_hash(text), legacy_drizzle_hash(text)

    def matches_hash(self, recorded: str) -> bool:
        return recorded in self.hashes()

    def up_statements(self) -> list[str]:
        return split_statements(self.up_sql)

    def down_statements(self) -> list[str]:
        return split_statements(_read_text(self.down_path))


@dataclass(frozen=True)
class MigrationsFolder:
    """A drizzle-kit output folder, read through its journal."""

    path: Path
    migrations: tuple[Migration, ...]

    @classmethod
    def load(cls, path: Path) -> MigrationsFolder:
        journal_path = path / JOURNAL
        hint = (
            "point 'migrations.folder' of the target at drizzle-kit's output folder "
            "(the one holding meta/_journal.json)"
        )
        try:
            document = json.loads(journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no drizzle journal at {journal_path}", hint=hint) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the drizzle journal {journal_path}: {exc}") from None
        entries = document.get("entries") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"{journal_path} has no 'entries' list", hint=hint)
        migrations = []
        for position, entry in enumerate(entries):
            try:
                tag = str(entry["tag"])
                when = int(entry["when"])
                idx = int(entry.get("idx", position))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"{journal_path}: entry {position} lacks a valid 'tag' and 'when'",
                    hint="restore the journal from version control; drizzle-kit writes both",
                ) from None
            if "/" in tag or "\\" in tag or tag.startswith("."):
                raise ConfigError(f"{journal_path}: entry {position} has an unsafe tag {tag!r}")
            migrations.append(
                Migration(
                    idx=idx,
                    tag=tag,
                    when=when,
                    up_path=path / f"{tag}{UP_SUFFIX}",
                    down_path=path / f"{tag}{DOWN_SUFFIX}",
                )
            )
        return cls(path=path, migrations=tuple(migrations))

    def by_when(self, when: int) -> list[Migration]:
        return [m for m in self.migrations if m.when == when]


def migrations_folder_of(target: Target) -> MigrationsFolder:
    if target.migrations_folder is None or target.settings.migrations is None:
        raise ConfigError(
            f"target '{target.name}' has no migrations configured",
            hint=f"add 'migrations: {{folder: path/to/drizzle}}' under targets.{target.name} in "
            "the targets file",
        )
    return MigrationsFolder.load(target.migrations_folder)


# --- the tracking table -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingTable:
    """drizzle's applied-migrations table (schema and name configurable)."""

    schema: str = "drizzle"
    name: str = "__drizzle_migrations"

    @classmethod
    def of(cls, target: Target) -> TrackingTable:
        settings = target.settings.migrations
        return cls(settings.table_schema, settings.table_name) if settings else cls()

    @property
    def identifier(self) -> sql.Composable:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the tracking table."""

    id: int
    hash: str
    created_at: int | None


def read_applied(conn: psycopg.Connection, table: TrackingTable) -> list[AppliedMigration]:
    """Every row of the tracking table, oldest first (by ``created_at``, as drizzle orders)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (sql.Identifier(table.schema, table.name).as_string(conn),),
        )
        row = cur.fetchone()
        if not row or not row[0]:
            raise RollbackRefusedError(
                f"the migrations table {table} does not exist in this database; "
                "no migration was ever applied here by drizzle",
                hint="check the target, or 'migrations.table_schema' / 'migrations.table_name'",
            )
        cur.execute(
            sql.SQL(
                "SELECT id, hash, created_at FROM {} ORDER BY created_at NULLS FIRST, id"
            ).format(table.identifier)
        )
        return [AppliedMigration(int(i), str(h), None if c is None else int(c)) for i, h, c in cur]


def apply_migrations(
    conn: psycopg.Connection,
    folder: MigrationsFolder,
    table: TrackingTable = TrackingTable(),
    *,
    upto: int | None = None,
) -> list[str]:
    """Apply pending migrations exactly as drizzle-orm's ``migrate()`` does; return their tags.

    Creates the schema and table if missing, then, in ONE transaction, runs every journal entry
    whose ``when`` is newer than the newest ``created_at``, statement by statement, inserting
    ``(hash, created_at)`` after each. ``upto`` limits it to the first ``upto`` journal entries
    (to build a database as it was at that point in history). Used by tests and the demo; in
    production the application's own drizzle migrator does this.
    """
    ident = table.identifier
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, hash text NOT NULL, "
            "created_at bigint)"
        ).format(ident)
    )
    last = conn.execute(
        sql.SQL("SELECT created_at FROM {} ORDER BY created_at DESC LIMIT 1").format(ident)
    ).fetchone()
    conn.commit()  # the migrations below then run in their own, single transaction
    applied: list[str] = []
    candidates = folder.migrations if upto is None else folder.migrations[:upto]
    with conn.transaction():
        for migration in candidates:
            if last is not None and last[0] is not None and int(last[0]) >= migration.when:
                continue
            for statement in migration.up_statements():
                conn.execute(statement)  # no parameters: simple protocol, like drizzle's sql.raw
            conn.execute(
                sql.SQL('INSERT INTO {} ("hash", "created_at") VALUES (%s, %s)').format(ident),
                (migration.hashes()[0], migration.when),
            )
            applied.append(migration.tag)
    return applied


# --- planning -----------------------------------------------------------------------------------


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
        down_text = _read_text(migration.down_path)
        control = _TRANSACTION_CONTROL.search(down_text)
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


def _connection(target: Target) -> ConnectionInfo:
    return ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )


def plan_rollback(target: Target, steps: int) -> RollbackPlan:
    """Read the tracking table and the folder and work out the rollback. Changes nothing."""
    folder = migrations_folder_of(target)
    table = TrackingTable.of(target)
    info = _connection(target)
    with connect(info) as conn:
        conn.read_only = True
        try:
            applied = read_applied(conn, table)
        except psycopg.Error as exc:
            raise MigrationError(
                f"cannot read {table} in {info.describe()}: {_db_error_text(exc, info)}",
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


# --- running ------------------------------------------------------------------------------------


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


def _db_error_text(exc: psycopg.Error, info: ConnectionInfo) -> str:
    diag = getattr(exc, "diag", None)
    primary = (diag.message_primary if diag else None) or str(exc).strip().splitlines()[0]
    text = f"{diag.sqlstate + ' ' if diag and diag.sqlstate else ''}{primary}"
    if diag and diag.message_detail:
        text += f" ({diag.message_detail})"
    return info.redact(text)


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
                f"({current_step.migration.down_path.name}): {_db_error_text(exc, info)}. "
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
            f"the rollback failed: {_db_error_text(exc, info)}; {unchanged}",
            hint=hint,
            safety_backup=backup_path,
        ) from None
    try:
        conn.commit()
    except psycopg.Error as exc:
        raise RollbackFailedError(
            f"committing the rollback failed: {_db_error_text(exc, info)}; the outcome is "
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

    info = _connection(target)
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
