"""amcheck on a restored database: bt_index_check(heapallindexed => true) on every leaf btree
index, proving the restored indexes match their tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

# The indexes amcheck's bt_index_check can verify: leaf btree indexes (relkind 'i'; a
# partitioned table's index, relkind 'I', has no storage and is rejected) that are valid, ready
# and live, of user tables and populated materialized views. Not temporary ones (another
# session's temp table cannot be read), not system catalogs and not TOAST indexes: the drill
# verifies what the dump restored.
BTREE_INDEXES_SQL = """
SELECT c.oid, c.oid::regclass::text
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_am am ON am.oid = c.relam
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'i'
  AND am.amname = 'btree'
  AND t.relkind IN ('r', 'm')
  AND (t.relkind <> 'm' OR t.relispopulated)
  AND i.indisvalid AND i.indisready AND i.indislive
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 2
"""


_SCHEMA = "backup_pipelines_amcheck"


@dataclass
class AmcheckOutcome:
    available: bool
    detail: str
    indexes_checked: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def _amcheck_schema(conn: psycopg.Connection) -> str | None:
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'amcheck'"
    ).fetchone()
    return str(row[0]) if row else None


def run_amcheck(conn: psycopg.Connection) -> AmcheckOutcome:
    """``bt_index_check(heapallindexed => true)`` on every leaf btree index of ``conn``'s database.

    ``conn`` must be in autocommit mode. When the extension cannot be created or used (not
    installed, or the role may not create it or run its functions) the outcome says so; that
    is not a failure of the backup. The extension may already be there, in any schema, when
    the restored database brought it along.
    """
    try:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        except psycopg.errors.InvalidSchemaName:
            # The database's search_path names no schema to create in (search_path = '' as
            # hardening): a schema of its own, in the scratch copy the drill drops afterwards.
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(_SCHEMA)))
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS amcheck SCHEMA {}").format(
                    sql.Identifier(_SCHEMA)
                )
            )
        schema = _amcheck_schema(conn)
    except psycopg.Error as exc:
        reason = (exc.diag.message_primary or str(exc)).strip()
        return AmcheckOutcome(False, f"amcheck unavailable on the drill server: {reason}")
    if schema is None:
        return AmcheckOutcome(False, "amcheck unavailable on the drill server: not installed")
    check = sql.SQL(
        "SELECT {}.bt_index_check(index => %s::oid::regclass, heapallindexed => true)"
    ).format(sql.Identifier(schema))
    indexes = conn.execute(BTREE_INDEXES_SQL).fetchall()
    failures: dict[str, str] = {}
    for oid, name in indexes:
        try:
            conn.execute(check, (oid,))
        except psycopg.errors.InsufficientPrivilege as exc:
            reason = (exc.diag.message_primary or str(exc)).strip()
            return AmcheckOutcome(False, f"amcheck unavailable on the drill server: {reason}")
        except psycopg.errors.UndefinedTable:
            continue  # dropped while we checked: nothing left to verify
        except psycopg.Error as exc:
            failures[name] = (exc.diag.message_primary or str(exc)).strip()
    detail = (
        f"bt_index_check passed on {len(indexes)} btree indexes"
        if not failures
        else f"bt_index_check failed on {len(failures)} of {len(indexes)} btree indexes: "
        + "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
    )
    return AmcheckOutcome(True, detail, len(indexes), failures)
