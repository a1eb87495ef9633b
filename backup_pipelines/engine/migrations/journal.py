"""The migrations folder in drizzle-kit's layout (journal, up and down files) and drizzle's
tracking table of applied migrations."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.migrations.errors import RollbackRefusedError

BREAKPOINT = "--> statement-breakpoint"
JOURNAL = Path("meta") / "_journal.json"
UP_SUFFIX = ".sql"
DOWN_SUFFIX = ".down.sql"

# A whole statement that ends the transaction would break "all or nothing": refuse such files.
TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION|ABORT)"
    r"(\s+(WORK|TRANSACTION|AND\s+(NO\s+)?CHAIN))*\s*;",
    re.IGNORECASE | re.MULTILINE,
)


def drizzle_hash(text: str) -> str:
    """The hash drizzle-orm records: SHA-256 hex of the file's text, CRLF normalised to LF."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def legacy_drizzle_hash(text: str) -> str:
    """What drizzle-orm releases before the CRLF normalisation recorded (the text as read)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_statements(text: str) -> list[str]:
    """Split a migration file the way drizzle-orm does, dropping pieces with nothing to run."""
    return [piece for piece in text.replace("\r\n", "\n").split(BREAKPOINT) if piece.strip()]


def read_migration_text(path: Path) -> str:
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
        return read_migration_text(self.up_path)

    def hashes(self) -> tuple[str, str]:
        text = self.up_sql
        return drizzle_hash(text), legacy_drizzle_hash(text)

    def matches_hash(self, recorded: str) -> bool:
        return recorded in self.hashes()

    def up_statements(self) -> list[str]:
        return split_statements(self.up_sql)

    def down_statements(self) -> list[str]:
        return split_statements(read_migration_text(self.down_path))


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
