"""Errors the engine raises. Each one says what went wrong and what to do about it."""

from __future__ import annotations


class BackupPipelinesError(Exception):
    """Base class: a failure the operator can act on. ``str()`` is safe to log."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\nWhat to do: {hint}")


class ConfigError(BackupPipelinesError):
    """The targets file is missing, malformed, or refers to something that does not exist."""

    exit_code = 2


class DatabaseUnreachableError(BackupPipelinesError):
    """The database could not be reached or refused our credentials."""


class ToolError(BackupPipelinesError):
    """A PostgreSQL client tool is missing, too old, or exited with an error."""


class BackupFailedError(BackupPipelinesError):
    """A backup could not be completed; nothing that looks complete was left behind."""


class IntegrityError(BackupPipelinesError):
    """A backup file does not match its checksum, cannot be read, or is incomplete."""


class RestoreFailedError(BackupPipelinesError):
    """A restore (or restore test) failed; the original database was not modified."""


class EncryptionError(BackupPipelinesError):
    """A key or passphrase is missing or wrong."""
