"""Restoring a backup in place of a target's database, safely.

Restores always go into a *new* database, so a failure never touches another one. The in-place
restore of a target (:func:`restore_database`) is a short list of named, timed steps (each a
function in ``steps.py``) and touches the live database only in the last one:

1. ``locate``: open the backup (path under the backup root, ``s3://`` in the bucket, or
   ``latest``) and check it is a backup of this target's database; then the operator confirms
   by typing the target's name (or passing it).
2. ``download``: an offsite copy is fetched once into the work folder.
3. ``verify``: checksum, decryption and decompression of the whole backup.
4. ``safety_backup``: a ``pre-restore`` backup of the current database (abort if it fails).
5. ``roles``: the roles the backup needs that this server lacks are created from the backup's
   globals file, with their memberships and settings; existing roles are never changed.
6. ``restore``: into a new database ``<db>_restoring_<time>``.
7. ``check``: every table's row count against the backup's ``.meta``.
8. ``swap``: block connections to the live database, terminate its sessions, and rename both
   databases in one transaction; the replaced one is kept as ``<db>_pre_restore_<time>``.
9. cleanup: replaced databases past ``restore.drop_previous_after_hours`` are dropped.

A failure in steps 1-8 leaves the live database as it was; the error names the step and the
safety backup. The other modules of the package: ``locate`` (finding and fetching the backup),
``database`` (create, label, swap databases), ``roles`` (the missing roles from a backup's
globals, never changing existing ones), ``runner`` (psql / pg_restore), ``cleanup``
(leftovers of killed restores, replaced databases, ``restore-cleanup``, the restore lock).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.engine.progress import (
    DEFAULT_PROGRESS_INTERVAL_SECONDS,
    ProgressReporter,
    reporter_for,
)
from backup_pipelines.engine.restore import steps
from backup_pipelines.engine.restore.cleanup import restore_lock
from backup_pipelines.engine.restore.errors import RestoreRefusedError, RestoreStepError

__all__ = ["RestoreRefusedError", "RestoreReport", "RestoreStepError", "restore_database"]

logger = logging.getLogger("backup_pipelines")


@dataclass
class RestoreReport:
    """What a successful restore did; every value is safe to log and to show in the UI."""

    target: str
    database: str
    server: str
    backup: str
    backup_taken_at: datetime
    safety_backup: str | None
    previous_database: str | None
    previous_dropped: bool
    tables: int
    rows: int
    terminated_sessions: int
    duration_seconds: float
    step_seconds: dict[str, float]
    expired_copies_dropped: list[str] = field(default_factory=list)
    roles_created: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"restored {self.backup} into {self.server} "
            f"(database {self.database}) in {self.duration_seconds:.1f}s",
            f"  {self.tables} tables, {self.rows} rows match the backup's metadata",
            f"  safety backup: {self.safety_backup or 'none (the database did not exist)'}",
        ]
        if self.previous_database and not self.previous_dropped:
            lines.append(f"  previous database kept as: {self.previous_database}")
        elif self.previous_database:
            lines.append(f"  previous database dropped: {self.previous_database}")
        if self.roles_created:
            lines.append(f"  created missing roles: {', '.join(self.roles_created)}")
        if self.terminated_sessions:
            lines.append(f"  terminated {self.terminated_sessions} open session(s)")
        for name in self.expired_copies_dropped:
            lines.append(f"  dropped expired previous copy: {name}")
        lines.append(
            "  steps: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in self.step_seconds.items())
        )
        return "\n".join(lines)


def restore_database(
    config: ProjectConfig,
    target_name: str,
    backup: str,
    *,
    confirm: str | None,
    log: Any = None,
    prompt: Callable[[str], str] | None = None,
    allow_other_database: bool = False,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
    progress: ProgressReporter | None = None,
    database: str | None = None,
) -> RestoreReport:
    """Replace the target's database with ``backup``, safely (see the module docstring).

    ``database``: which database of a server target (``databases: all``); required for one.

    Long steps (download, safety backup, restore) report to ``progress``; by default lines in
    ``log`` at most every ``progress_interval`` seconds.

    Raises ConfigError (unknown target), RestoreRefusedError or ConfirmationError (nothing
    touched), or RestoreStepError naming the failed step and the safety backup.
    """
    log = log or logger
    run = steps.start(
        config,
        target_name,
        log=log,
        progress=reporter_for(progress, log, progress_interval),
        database=database,
    )
    artifact = run.step("locate", steps.locate, run, backup, allow_other_database, wrap=False)
    steps.confirm(run, artifact, confirm, prompt)
    with restore_lock(run.target), contextlib.ExitStack() as stack:
        local = artifact
        if not artifact.is_local:
            local = run.step("download", steps.download, run, artifact, stack)
        run.step("verify", steps.verify, run, local)
        exists, tools = run.step("connect", steps.inspect_server, run, timed=False)
        run.step("safety_backup", steps.take_safety_backup, run, exists)
        run.step("roles", steps.create_roles, run, local, hint=steps.ROLES_HINT)
        try:
            run.step("restore", steps.restore_into_new_database, run, local, tools)
            restored = run.step("check", steps.check_row_counts, run, local)
            run.step("swap", steps.swap_in, run, exists, local, hint=steps.SWAP_HINT)
        except BaseException:
            steps.drop_restoring_copy(run)
            raise
    run.log.info(
        f"Database '{run.database}' now holds {Path(artifact.location).name}"
        + (f"; the replaced database is kept as {run.previous}" if run.previous else "")
    )
    previous_dropped, expired = steps.drop_old_copies(run)
    return RestoreReport(
        target=run.target.name,
        database=run.database,
        server=run.server,
        backup=artifact.location,
        backup_taken_at=artifact.meta.started_at,
        safety_backup=run.safety_backup,
        previous_database=run.previous,
        previous_dropped=previous_dropped,
        tables=len(restored),
        rows=sum(restored.values()),
        terminated_sessions=run.terminated_sessions,
        duration_seconds=round(time.monotonic() - run.started, 3),
        step_seconds={step: round(seconds, 3) for step, seconds in run.step_seconds.items()},
        expired_copies_dropped=expired,
        roles_created=list(run.roles.created) if run.roles else [],
    )
