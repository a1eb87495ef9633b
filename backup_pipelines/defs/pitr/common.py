"""Names and target selection shared by the PITR definitions."""

import dagster as dg

from backup_pipelines.defs.shared import project_config, target_key
from backup_pipelines.engine.config import TargetSettings

BASE_BACKUP = "base_backup"
BASE_BACKUP_OFFSITE = "base_backup_offsite"
WAL_ARCHIVE = "wal_archive"
PITR_DRILL = "pitr_drill"

BASE_BACKUP_VERIFIED = "base_backup_verified"
WAL_ARCHIVE_HEALTHY = "wal_archive_healthy"
PITR_DRILL_PASSED = "pitr_drill_passed"


def pitr_targets() -> dict[str, TargetSettings]:
    """Only targets with a ``pitr:`` block get PITR assets."""
    return {name: s for name, s in project_config().targets.items() if s.pitr is not None}


def key(target: str, name: str) -> dg.AssetKey:
    return target_key(target, name)
