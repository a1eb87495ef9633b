"""Errors the engine raises. Each one says what went wrong and what to do about it.

Exit status of the ``backup-pipelines`` command (README "Exit status"), decided here and only
here by :func:`exit_code_for`:

- ``0`` the operation succeeded;
- ``1`` the operation was attempted and failed (a database, a tool, the disk or S3 failed; a
  backup did not verify). Retrying later may succeed;
- ``2`` bad configuration, usage or a refusal: the tool did not start the operation (or stopped
  before changing anything) because something an operator must fix or decide is in the way:
  the targets file, a missing or wrong key, a folder it cannot write, a missing confirmation,
  a backup of the wrong database, another backup or restore of the same target running.
  Retrying without a change gives the same answer.

An error class belongs to the refusal family by deriving from :class:`ConfigError` or
:class:`RefusedError`; every other :class:`BackupPipelinesError` exits 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2


class BackupPipelinesError(Exception):
    """Base class: a failure the operator can act on. ``str()`` is safe to log."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\nWhat to do: {hint}")

    @property
    def exit_code(self) -> int:
        return exit_code_for(self)

    def one_line(self) -> str:
        """The error as one line (for logs and terminals): what is wrong, then what to do."""
        message = ""
        for part in (p.strip() for p in self.message.splitlines()):
            if part:
                message += (" " if message.endswith(":") else "; ") + part if message else part
        if not self.hint:
            return message
        return f"{message.rstrip('.')}. What to do: {self.hint}"


class ConfigError(BackupPipelinesError):
    """The targets file is missing, malformed, or refers to something that does not exist."""


class RefusedError(BackupPipelinesError):
    """The operation was refused before anything was changed (unsafe, unconfirmed or busy)."""


class FolderError(ConfigError):
    """A folder the configuration names cannot be created, is not a folder, or is not writable."""


class TargetBusyError(RefusedError):
    """Another backup or restore of the same target holds its lock; nothing was started."""


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
    """gpg failed while encrypting or decrypting."""


class EncryptionKeyError(EncryptionError, ConfigError):
    """Encryption cannot be set up: a configured key or passphrase is missing, unreadable,
    unusable or not the one a backup needs, or gpg is not installed."""


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for an error (see the module docstring)."""
    if isinstance(exc, ConfigError | RefusedError):
        return EXIT_REFUSED
    return EXIT_FAILED
