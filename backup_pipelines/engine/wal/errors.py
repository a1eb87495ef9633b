"""What can go wrong in the WAL archive (the CLI maps these to PostgreSQL's exit statuses)."""

from __future__ import annotations

from backup_pipelines.engine.errors import BackupPipelinesError


class WalError(BackupPipelinesError):
    """A WAL file could not be archived or fetched."""


class WalConflictError(WalError):
    """A *different* file is already archived under this name; it is never overwritten."""


class WalNotFoundError(WalError):
    """The requested file is not in the archive (normal at the end of recovery)."""
