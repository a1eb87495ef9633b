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


@dataclass
class StatusSnapshot:
    """What the instance knows about many assets, read by a few batched queries (one tick of a
    sensor builds one): the asset records (newest materialization, last run that planned or
    materialized each asset), the runs that planned an asset after its newest materialization,
    and the latest execution of each ERROR check. Per-asset queries happen only for rare cases
    (a newest backup dated in the future, a check evaluation still in progress, a duration
    missing from the metadata)."""

    instance: dg.DagsterInstance
    entries: dict[dg.AssetKey, Any] = field(default_factory=dict)
    runs: dict[str, dg.DagsterRun] = field(default_factory=dict)
    checks: dict[dg.AssetCheckKey, Any] = field(default_factory=dict)

    def latest(self, key: dg.AssetKey) -> dg.EventLogRecord | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.last_materialization_record


def read_status(
    instance: dg.DagsterInstance,
    keys: list[dg.AssetKey],
    check_keys: list[dg.AssetCheckKey] | None = None,
) -> StatusSnapshot:
    snapshot = StatusSnapshot(instance)
    if keys:
        for record in instance.get_asset_records(keys):
            snapshot.entries[record.asset_entry.asset_key] = record.asset_entry
    # ``last_run_id`` is the run of the newest materialization *or planned* materialization:
    # when it differs from the newest materialization's run, a later attempt was planned.
    planned = {
        entry.last_run_id
        for entry in snapshot.entries.values()
        if entry.last_run_id
        and (
            entry.last_materialization_record is None
            or entry.last_run_id != entry.last_materialization_record.run_id
        )
    }
    if planned:
        for run in instance.get_runs(filters=dg.RunsFilter(run_ids=sorted(planned))):
            snapshot.runs[run.run_id] = run
    if check_keys:
        snapshot.checks = dict(
            instance.event_log_storage.get_latest_asset_check_execution_by_key(list(check_keys))
        )
    return snapshot


def _latest_evaluation(snapshot: StatusSnapshot, check_key: dg.AssetCheckKey) -> Any:
    record = snapshot.checks.get(check_key)
    if record is None:
        return None
    event = record.event.dagster_event if record.event is not None else None
    if event is not None and isinstance(event.event_specific_data, dg.AssetCheckEvaluation):
        return record
    # The latest execution is still planned (running): the latest finished one decides.
    return snapshot.instance.get_latest_asset_check_evaluation_record(check_key)


def asset_outcome(
    snapshot: StatusSnapshot,
    key: dg.AssetKey,
    error_checks: tuple[str, ...] = (),
    *,
    with_duration: bool = True,
) -> AssetOutcome:
    """The latest attempt at ``key``: a failed run that planned it, or a materialization whose
    ERROR check failed afterwards, counts as a failure."""
    latest = snapshot.latest(key)
    ok: bool | None = None if latest is None else True

    entry = snapshot.entries.get(key)
    last_run_id = None if entry is None else entry.last_run_id
    if last_run_id and (latest is None or last_run_id != latest.run_id):
        run = snapshot.runs.get(last_run_id)
        if run is not None and run.status in _FAILED_RUN:
            ok = False

    checks_failed = False
    if latest is not None:
        for check_name in error_checks:
            record = _latest_evaluation(snapshot, dg.AssetCheckKey(key, check_name))
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
    if duration is None and with_duration:
        duration = _step_duration(snapshot.instance, latest.run_id, key)
    return AssetOutcome(
        ok=ok,
        last_success_timestamp=None if checks_failed else latest.timestamp,
        metadata=metadata,
        run_id=latest.run_id,
        duration_seconds=duration,
    )


def backup_in_progress(
    instance: dg.DagsterInstance, target: str, snapshot: StatusSnapshot | None = None
) -> bool:
    """A run that will back the target up is queued or running right now. With a ``snapshot``
    holding the target's backup asset, no further query is needed."""
    key = target_key(target, LOGICAL_BACKUP)
    if snapshot is not None and key in snapshot.entries:
        entry = snapshot.entries[key]
        latest = entry.last_materialization_record
        if not entry.last_run_id or (latest is not None and entry.last_run_id == latest.run_id):
            return False  # no attempt planned after the newest backup
        run = snapshot.runs.get(entry.last_run_id)
        return run is not None and run.status in _UNFINISHED_RUN
    if snapshot is not None:
        return False  # never planned nor materialized
    planned = instance.get_latest_planned_materialization_info(key)
    if planned is None:
        return False
    run = instance.get_run_by_id(planned.run_id)
    return run is not None and run.status in _UNFINISHED_RUN


def newest_backup_timestamp(
    instance: dg.DagsterInstance,
    config: ProjectConfig,
    target: str,
    snapshot: StatusSnapshot | None = None,
) -> float | None:
    """When the newest successful backup finished: from Dagster, or from a backup file on disk
    (taken by `backup-pipelines backup` from cron), whichever is newer. Neither counts when it
    is dated in the future (recorded while the clock was fast): see ``engine.listing``.
    A server target (``databases: all``) is as fresh as its stalest database (one database
    failing every night must not hide behind the others): the oldest of its databases' newest
    backups, None when one of them has none yet. With a ``snapshot`` holding a single-database
    target's backup asset, Dagster is asked again only when the newest materialization is
    dated in the future."""
    if config.targets[target].is_server:
        per_database = [
            _newest_of(instance, config, target, database, None)
            for database in instance.get_dynamic_partitions(partitions_name(target))
        ]
        if not per_database or None in per_database:
            return None
        return min(t for t in per_database if t is not None)
    return _newest_of(instance, config, target, None, snapshot)


def _newest_of(
    instance: dg.DagsterInstance,
    config: ProjectConfig,
    target: str,
    database: str | None,
    snapshot: StatusSnapshot | None,
) -> float | None:
    now = utc_now()
    candidates = []
    key = target_key(target, LOGICAL_BACKUP)
    dagster_newest: datetime | None = None
    scan = snapshot is None
    if snapshot is not None and (latest := snapshot.latest(key)) is not None:
        moment = datetime.fromtimestamp(latest.timestamp, UTC)
        scan = is_future(moment, now)
        dagster_newest = None if scan else moment
    if scan:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=key,
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


def metric_keys(config: ProjectConfig) -> tuple[list[dg.AssetKey], list[dg.AssetCheckKey]]:
    """The assets and ERROR checks the metrics read, for :func:`read_status`."""
    keys = []
    check_keys = []
    for target in config.targets:
        for asset in (LOGICAL_BACKUP, RESTORE_DRILL, OFFSITE_COPY):
            key = target_key(target, asset)
            keys.append(key)
            check_keys += [dg.AssetCheckKey(key, name) for name in ERROR_CHECKS[asset]]
    return keys, check_keys


def collect_metrics(instance: dg.DagsterInstance, config: ProjectConfig) -> list[TargetMetrics]:
    snapshot = read_status(instance, *metric_keys(config))
    results = []
    for target in config.targets:
        backup = asset_outcome(
            snapshot, target_key(target, LOGICAL_BACKUP), ERROR_CHECKS[LOGICAL_BACKUP]
        )
        drill = asset_outcome(
            snapshot, target_key(target, RESTORE_DRILL), ERROR_CHECKS[RESTORE_DRILL]
        )
        offsite = asset_outcome(
            snapshot,
            target_key(target, OFFSITE_COPY),
            ERROR_CHECKS[OFFSITE_COPY],
            with_duration=False,  # not exported
        )
        size = backup.metadata.get("size_bytes")
        results.append(
            TargetMetrics(
                target=target,
                backup_success=backup.ok,
                backup_last_success_timestamp=newest_backup_timestamp(
                    instance, config, target, snapshot
                ),
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
