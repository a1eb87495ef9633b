"""How one look at a WAL archive is shown: by ``wal_archive_healthy`` and ``wal_archive_sensor``."""

import dagster as dg

from backup_pipelines.engine.pitr.health import ArchiveHealth
from backup_pipelines.lib.names import WAL_ARCHIVE, WAL_ARCHIVE_HEALTHY, target_key


def health_metadata(health: ArchiveHealth) -> dict[str, dg.MetadataValue]:
    """What the UI shows for one look at the WAL archive (observation and check alike)."""
    metadata: dict[str, dg.MetadataValue] = {
        "result": dg.MetadataValue.text(health.summary()),
        "archive": dg.MetadataValue.text(health.archive),
        "segments": dg.MetadataValue.int(health.segments),
        "newest_segment": dg.MetadataValue.text(health.newest_segment or ""),
        "first_needed_segment": dg.MetadataValue.text(health.first_needed_segment or ""),
        "gaps": dg.MetadataValue.json([g.__dict__ for g in health.gaps]),
        "lag_limit_seconds": dg.MetadataValue.float(float(health.lag_limit_seconds)),
        "archiver": dg.MetadataValue.json(health.archiver),
    }
    if health.age_seconds is not None:
        metadata["newest_age_seconds"] = dg.MetadataValue.float(health.age_seconds)
    if health.newest_archived_at is not None:
        metadata["newest_archived_at"] = dg.MetadataValue.text(
            health.newest_archived_at.isoformat()
        )
    if health.unarchived_segments is not None:
        metadata["unarchived_segments"] = dg.MetadataValue.int(health.unarchived_segments)
    if health.server_error:
        metadata["server_error"] = dg.MetadataValue.text(health.server_error)
    return metadata


def health_check_evaluation(target: str, health: ArchiveHealth) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=target_key(target, WAL_ARCHIVE),
        check_name=WAL_ARCHIVE_HEALTHY,
        passed=health.healthy,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=health_metadata(health),
    )
