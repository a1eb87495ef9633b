"""``pitr_restore``: restore a target as it was at a moment into a NEW data directory, from the
Launchpad. The same engine call and settings as ``backup-pipelines pitr-restore``."""

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.window import parse_target_time
from backup_pipelines.lib.project import pitr_targets
from backup_pipelines.lib.results import user_error
from backup_pipelines.lib.tags import job_tags

PITR_RESTORE_OP = "restore_to_time"


class PitrRestoreConfig(dg.Config):
    """Launchpad: ops.restore_to_time.config (the CLI's pitr-restore options)."""

    target: str = Field(description="Target to restore, e.g. production.")
    to: str = Field(
        description="Moment to recover to: '2026-11-24 15:30:00' (targets-file timezone) or ISO 8601."
    )
    data_dir: str = Field(description="New (or empty) folder for the restored cluster.")
    port: int | None = Field(default=None, description="Port of the restored server.")
    start: bool = Field(default=False, description="Start it and wait until it is promoted.")
    keep_archiving: bool = Field(
        default=False,
        description="Leave archive_mode as in the backup (only when the copy becomes the new primary).",
    )


@dg.op(name=PITR_RESTORE_OP, out=dg.Out(dict))
def pitr_restore_op(
    context: dg.OpExecutionContext, config: PitrRestoreConfig, backup_engine: BackupEngineResource
) -> dg.Output:
    """Pick the newest base backup consistent before the moment, extract it (0700, owned by the
    server's OS user), configure recovery (recovery.signal, restore_command = wal-fetch,
    recovery_target_time, recovery_target_action = 'promote'), optionally start and wait."""
    try:
        project = backup_engine.project()
        target = project.target(config.target)
        to = parse_target_time(config.to, project.timezone)
        result = pitr_restore(
            project,
            target,
            to,
            Path(config.data_dir),
            port=config.port,
            start=config.start,
            keep_archiving=config.keep_archiving,
            log=context.log,
        )
    except BackupPipelinesError as exc:
        raise user_error(exc) from None
    summary: dict[str, Any] = {
        "data_dir": str(result.data_dir),
        "base_backup": result.base_backup,
        "target_time": result.target_time.isoformat(),
        "started": result.started,
        "promoted": result.promoted,
        "reached": result.reached.isoformat() if result.reached else None,
        "timeline": result.timeline,
        "restore_seconds": result.restore_seconds,
        "warnings": result.warnings,
    }
    metadata: dict[str, Any] = {
        "summary": dg.MetadataValue.text(result.summary()),
        "data_dir": dg.MetadataValue.path(str(result.data_dir)),
        "base_backup": result.base_backup,
        "target_time": result.target_time.isoformat(),
        "promoted": result.promoted,
        "reached": summary["reached"] or "",
        "restore_seconds": dg.MetadataValue.float(result.restore_seconds),
    }
    return dg.Output(summary, metadata=metadata)


@dg.job(
    name="pitr_restore",
    description="Point-in-time restore of a PITR target into a NEW data directory (never over an "
    "existing cluster); run config: ops.restore_to_time.config. Its runs carry the target's "
    "tag, so a restore waits for a running backup of the same target.",
    tags=job_tags("pitr_restore"),
)
def pitr_restore_job() -> None:
    pitr_restore_op()


@dg.definitions
def pitr_jobs() -> dg.Definitions:
    if not pitr_targets():
        return dg.Definitions()
    return dg.Definitions(jobs=[pitr_restore_job])
