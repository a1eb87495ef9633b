"""How a restore says no, and how it says where it stopped."""

from __future__ import annotations

from backup_pipelines.engine.errors import RefusedError, RestoreFailedError


class RestoreRefusedError(RefusedError):
    """The request was refused before anything was touched (bad backup location, wrong database)."""


class RestoreStepError(RestoreFailedError):
    """A restore stopped at ``step``; the live database is as it was before the restore."""

    def __init__(
        self,
        step: str,
        message: str,
        hint: str | None = None,
        *,
        safety_backup: str | None = None,
    ) -> None:
        self.step = step
        self.safety_backup = safety_backup
        super().__init__(message, hint)
