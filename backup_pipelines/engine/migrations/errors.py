"""How migration commands fail, and database errors as one line without secrets."""

from __future__ import annotations

from pathlib import Path

import psycopg

from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupPipelinesError, RefusedError


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


def db_error_text(exc: psycopg.Error, info: ConnectionInfo) -> str:
    diag = getattr(exc, "diag", None)
    primary = (diag.message_primary if diag else None) or str(exc).strip().splitlines()[0]
    text = f"{diag.sqlstate + ' ' if diag and diag.sqlstate else ''}{primary}"
    if diag and diag.message_detail:
        text += f" ({diag.message_detail})"
    return info.redact(text)
