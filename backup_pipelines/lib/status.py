"""What the Dagster instance knows about each target's backups, drills and offsite copies.

Read by the monitoring sensors (staleness, metrics). Only reads the event log: never runs work.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.clock import is_future, utc_now
from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.engine.listing import newest_backup
from backup_pipelines.engine.metrics import TargetMetrics, invalid_target_metrics
from backup_pipelines.lib.names import (
    DRILL_PASSED_CHECK,
    LOGICAL_BACKUP,
    OFFSITE_COPY,
    RESTORE_DRILL,
    target_key,
)
from backup_pipelines.lib.partitions import partitions_name

# The ERROR checks that make an otherwise materialized asset "not good".
ERROR_CHECKS: dict[str, tuple[str, ...]] = {
    LOGICAL_BACKUP: ("checksum_matches", "archive_readable"),
    OFFSITE_COPY: ("offsite_copy_matches",),
    RESTORE_DRILL: (DRILL_PASSED_CHECK,),
}
# Materializations looked at to find the newest one not recorded in the future.
FUTURE_SCAN_LIMIT = 50
# Metadata keys holding how long the work took, in order of preference.
DURATION_KEYS = ("rto_seconds", "duration_seconds", "restore_seconds")

_FAILED_RUN = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
_UNFINISHED_RUN = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
}


@dataclass(frozen=True)
class AssetOutcome:
    """``ok``: did the latest attempt succeed (None: never attempted). ``last_success_timestamp``:
    the newest materialization, unless an ERROR check failed on it."""

    ok: bool | None = None
    last_success_timestamp: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    duration_seconds: float | None = None


def _metadata_values(record: dg.EventLogRecord) -> dict[str, Any]:
    materialization = record.asset_materialization
    if materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def _step_duration(instance: dg.DagsterInstance, run_id: str, key: dg.AssetKey) -> float | None:
    step_key = "__".join(key.path)
    for stats in instance.get_run_step_stats(run_id, step_keys=[step_key]):
        if stats.start_time and stats.end_time:
            return stats.end_time - stats.start_time
    return None


def asset_outcome(
    instance: dg.DagsterInstance, key: dg.AssetKey, error_checks: tuple[str, ...] = ()
) -> AssetOutcome:
    """The latest attempt at ``key``: a failed run that planned it, or a materialization whose
    ERROR check failed afterwards, counts as a failure."""
    records = instance.fetch_materializations(key, limit=1).records
    latest = records[0] if records else None
    ok: bool | None = None if latest is None else True

    planned = instance.get_latest_planned_materialization_info(key)
    if planned is not None and (latest is None or planned.run_id != latest.run_id):
        run = instance.get_run_by_id(planned.run_id)
        if run is not None and run.status in _FAILED_RUN:
            ok = False

    checks_failed = False
    if latest is not None:
        for check_name in error_checks:
            record = instance.get_latest_asset_check_evaluation_record(
                dg.AssetCheckKey(key, check_name)
            )
            if record is None or record.event is None or record.event.dagster_event is None:
                continue
            evaluation = record.event.dagster_event.event_specific_data
            if (
                isinstance(evaluation, dg.AssetCheckEvaluation)
                and not evaluation.passed
                and evaluation.severity == dg.AssetCheckSeverity.ERROR
                and record.event.timestamp >= latest.timestamp
            ):
                checks_failed = True
    if checks_failed:
        ok = False

    if latest is None:
        return AssetOutcome(ok=ok)
    metadata = _metadata_values(latest)
    duration = next((float(metadata[k]) for k in DURATION_KEYS if k in metadata), None)
    if duration is None:
        duration = _step_duration(instance, latest.run_id, key)
    return AssetOutcome(
        ok=ok,
        last_success_timestamp=None if checks_failed else latest.timestamp,
        metadata=metadata,
        run_id=latest.run_id,
        duration_seconds=duration,
    )


def backup_in_progress(instance: dg.DagsterInstance, target: str) -> bool:
    """A run that will back the target up is queued or running right now."""
    planned = instance.get_latest_planned_materialization_info(target_key(target, LOGICAL_BACKUP))
    if planned is None:
        return False
    run = instance.get_run_by_id(planned.run_id)
    return run is not None and run.status in _UNFINISHED_RUN


def newest_backup_timestamp(
    instance: dg.DagsterInstance, config: ProjectConfig, target: str
) -> float | None:
    """When the newest successful backup finished: from Dagster, or from a backup file on disk
    (taken by `backup-pipelines backup` from cron), whichever is newer. Neither counts when it
    is dated in the future (recorded while the clock was fast): see ``engine.listing``.

    A server target (``databases: all``) is as fresh as its stalest database (one database
    failing every night must not hide behind the others): the oldest of its databases' newest
    backups, None when one of them has none yet."""
    if config.targets[target].is_server:
        per_database = [
            _newest_of(instance, config, target, database)
            for database in instance.get_dynamic_partitions(partitions_name(target))
        ]
        if not per_database or None in per_database:
            return None
        return min(t for t in per_database if t is not None)
    return _newest_of(instance, config, target, None)


def _newest_of(
    instance: dg.DagsterInstance, config: ProjectConfig, target: str, database: str | None
) -> float | None:
    now = utc_now()
    candidates = []
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=target_key(target, LOGICAL_BACKUP),
            asset_partitions=[database] if database is not None else None,
        ),
        limit=FUTURE_SCAN_LIMIT,
    ).records
    recorded = (datetime.fromtimestamp(r.timestamp, UTC) for r in records)
    dagster_newest = next((moment for moment in recorded if not is_future(moment, now)), None)
    if dagster_newest is not None:
        candidates.append(dagster_newest.timestamp())
    newest = newest_backup(list_artifacts(config.target(target, database).backup_dir), now=now)
    if newest is not None:
        candidates.append(min(newest.meta.finished_at, now).timestamp())
    return max(candidates) if candidates else None


def collect_metrics(instance: dg.DagsterInstance, config: ProjectConfig) -> list[TargetMetrics]:
    results = []
    for target in config.targets:
        backup = asset_outcome(
            instance, target_key(target, LOGICAL_BACKUP), ERROR_CHECKS[LOGICAL_BACKUP]
        )
        drill = asset_outcome(
            instance, target_key(target, RESTORE_DRILL), ERROR_CHECKS[RESTORE_DRILL]
        )
        offsite = asset_outcome(
            instance, target_key(target, OFFSITE_COPY), ERROR_CHECKS[OFFSITE_COPY]
        )
        size = backup.metadata.get("size_bytes")
        results.append(
            TargetMetrics(
                target=target,
                backup_success=backup.ok,
                backup_last_success_timestamp=newest_backup_timestamp(instance, config, target),
                backup_size_bytes=int(size) if size is not None else None,
                backup_duration_seconds=backup.duration_seconds,
                restore_drill_success=drill.ok,
                restore_drill_duration_seconds=drill.duration_seconds,
                restore_drill_last_success_timestamp=drill.last_success_timestamp,
                offsite_copy_success=offsite.ok,
                offsite_copy_last_success_timestamp=offsite.last_success_timestamp,
            )
        )
    return results + invalid_target_metrics(config)
