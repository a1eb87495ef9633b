"""PITR checks: ``base_backup_verified`` and ``pitr_drill_passed`` (blocking ERROR) and
``wal_archive_healthy`` (ERROR; also reported by ``wal_archive_sensor`` on every tick)."""

from typing import Any

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.backup.base import load_base_backup
from backup_pipelines.engine.backup.base_reader import verify_base_backup
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.pitr.health import archive_health
from backup_pipelines.lib.names import (
    BASE_BACKUP,
    BASE_BACKUP_VERIFIED,
    PITR_DRILL,
    PITR_DRILL_PASSED,
    WAL_ARCHIVE,
    WAL_ARCHIVE_HEALTHY,
    target_key,
)
from backup_pipelines.lib.pitr import health_metadata
from backup_pipelines.lib.project import pitr_targets
from backup_pipelines.lib.results import failure, latest_materialized_path


def _checks(name: str) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(
        asset=target_key(name, BASE_BACKUP),
        name=BASE_BACKUP_VERIFIED,
        blocking=True,
        description="Recomputes the base backup's SHA-256, extracts it into a scratch folder and "
        "runs `pg_verifybackup` against its `backup_manifest` (every file's size and checksum, and "
        "the WAL range it needs, parsed with pg_waldump). Blocks the offsite copy when it fails.",
    )
    def base_backup_verified(
        context: dg.AssetCheckExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.AssetCheckResult:
        path = latest_materialized_path(context, target_key(name, BASE_BACKUP))
        if path is None:
            return failure("no base backup materialized yet: materialize base_backup first")
        try:
            artifact, _ = load_base_backup(path)
            outcomes = verify_base_backup(artifact, backup_engine.target(name))
        except BackupPipelinesError as exc:
            return failure(exc.message, path=dg.MetadataValue.path(path))
        for outcome in outcomes:
            artifact = artifact.record_check(outcome.name, outcome.passed, outcome.message)
        passed = len(outcomes) == 2 and all(o.passed for o in outcomes)
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "path": dg.MetadataValue.path(path),
                **{
                    o.name: dg.MetadataValue.text(("ok: " if o.passed else "FAILED: ") + o.message)
                    for o in outcomes
                },
            },
        )

    @dg.asset_check(
        asset=target_key(name, WAL_ARCHIVE),
        name=WAL_ARCHIVE_HEALTHY,
        description="Fails when the WAL archive has a gap since the oldest kept base backup, "
        "`pg_stat_archiver` shows archive_command failing, or finished WAL waits longer than "
        "`pitr.archive_lag_limit_minutes`. `wal_archive_sensor` reports it on every tick.",
    )
    def wal_archive_healthy(backup_engine: BackupEngineResource) -> dg.AssetCheckResult:
        try:
            health = archive_health(backup_engine.target(name))
        except BackupPipelinesError as exc:
            return failure(exc.message)
        return dg.AssetCheckResult(
            passed=health.healthy,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=health_metadata(health),
        )

    @dg.asset_check(
        asset=target_key(name, PITR_DRILL),
        name=PITR_DRILL_PASSED,
        blocking=True,
        description="Passes when the newest PITR drill restored to its target moment exactly, "
        "promoted, accepted writes and opened every database.",
    )
    def pitr_drill_passed(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(target_key(name, PITR_DRILL))
        if event is None or event.asset_materialization is None:
            return failure("no PITR drill has run yet: materialize pitr_drill")
        metadata = event.asset_materialization.metadata
        passed_value = metadata.get("passed")
        passed = bool(passed_value.value) if passed_value is not None else False
        result = metadata.get("result")
        shown: dict[str, Any] = {"result": result.value if result is not None else "unknown"}
        for field in ("rto_seconds", "rpo_seconds", "base_backup", "target_time", "reached"):
            if field in metadata:
                shown[field] = metadata[field]
        return dg.AssetCheckResult(
            passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata=shown
        )

    return [base_backup_verified, wal_archive_healthy, pitr_drill_passed]


@dg.definitions
def pitr_checks() -> dg.Definitions:
    return dg.Definitions(asset_checks=[c for name in pitr_targets() for c in _checks(name)])
