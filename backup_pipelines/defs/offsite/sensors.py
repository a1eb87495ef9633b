"""After each new backup of a target: copy it offsite and apply retention (one run per backup).

The nightly job only takes the backups; ``offsite_and_retention_sensor`` follows every new
``<target>/logical_backup`` materialization with a run of ``<target>/offsite_copy`` (when
offsite copies are on) and ``<target>/backup_inventory``. A run that failed because S3 was down
is caught up by the next one.

One sensor watches every target: each tick reads the newest backup of all targets in one query
(``instance.get_asset_records``), so a thousand targets cost one tick, not a thousand. (It
replaced the per-target ``<target>_offsite_and_retention`` sensors.) Its cursor holds, per
target, the storage id of the newest backup already followed. A server target
(``databases: all``) keeps a sensor of its own, ``<target>_offsite_and_retention``, which
follows every database's backups (one partition each).
"""

import json

import dagster as dg

from backup_pipelines.lib.names import BACKUP_INVENTORY, LOGICAL_BACKUP, OFFSITE_COPY, target_key
from backup_pipelines.lib.partitions import (
    database_partitions,
    server_job_name,
    server_targets,
    single_targets,
)
from backup_pipelines.lib.project import offsite_enabled_targets, project_config
from backup_pipelines.lib.tags import TAG_KIND, job_tags, target_run_tags

JOB_NAME = "offsite_and_retention"
SENSOR_NAME = "offsite_and_retention_sensor"


def follow_up_keys(name: str) -> list[dg.AssetKey]:
    keys = [target_key(name, BACKUP_INVENTORY)]
    if name in offsite_enabled_targets():
        keys.insert(0, target_key(name, OFFSITE_COPY))
    return keys


def build_server_sensor(name: str) -> dg.SensorDefinition:
    """A server target's follow-ups: one run per backup of each database (its partition). The
    single-database targets share ``offsite_and_retention_sensor``; a partitioned asset has one
    newest backup per database, so a server target keeps a sensor of its own."""
    keys = follow_up_keys(name)

    @dg.asset_sensor(
        asset_key=target_key(name, LOGICAL_BACKUP),
        job_name=server_job_name(JOB_NAME, name),
        name=f"{name}_offsite_and_retention",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=f"After each new backup of a database of {name}: "
        + " then ".join(k.path[-1] for k in keys)
        + ".",
    )
    def follow_backup(
        context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry
    ) -> dg.RunRequest:
        return dg.RunRequest(
            # One follow-up per backup (reported backups have no run id: use their time).
            run_key=f"{name}:{asset_event.run_id or asset_event.timestamp}",
            asset_selection=keys,
            # The database (partition) the backup was of.
            partition_key=asset_event.dagster_event.partition
            if asset_event.dagster_event
            else None,
            # The same limits as the backup itself: one run per target, per server.
            tags={**target_run_tags(name), TAG_KIND: JOB_NAME},
        )

    return follow_backup


def follow_up_requests(
    instance: dg.DagsterInstance, targets: list[str], cursor: str | None
) -> tuple[list[dg.RunRequest], str]:
    """A run request for each target whose newest backup is newer than the one in ``cursor``
    (the newest backup of a target not yet in the cursor counts as new), and the new cursor."""
    try:
        seen: dict[str, int] = json.loads(cursor) if cursor else {}
    except ValueError:
        seen = {}
    keys = {target_key(name, LOGICAL_BACKUP): name for name in targets}
    requests = []
    for record in instance.get_asset_records(list(keys)):
        entry = record.asset_entry
        name = keys.get(entry.asset_key)
        latest = entry.last_materialization_record
        if name is None or latest is None or latest.storage_id <= seen.get(name, -1):
            continue
        seen[name] = latest.storage_id
        event = latest.event_log_entry
        requests.append(
            dg.RunRequest(
                # One follow-up per backup (reported backups have no run id: use their time).
                run_key=f"{name}:{event.run_id or event.timestamp}",
                asset_selection=follow_up_keys(name),
                # The same limits as the backup itself: one run per target, per server.
                tags={**target_run_tags(name), TAG_KIND: JOB_NAME},
            )
        )
    current = {name: seen[name] for name in targets if name in seen}
    return requests, json.dumps(current, sort_keys=True)


@dg.sensor(
    name=SENSOR_NAME,
    job_name=JOB_NAME,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="After each new backup of any target: its offsite_copy (when offsite copies are "
    "on) then its backup_inventory (calendar retention). One run per backup.",
)
def offsite_and_retention_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    names = single_targets(list(project_config().targets))
    requests, cursor = follow_up_requests(context.instance, names, context.cursor)
    context.update_cursor(cursor)
    return dg.SensorResult(run_requests=requests)


@dg.definitions
def offsite_sensors() -> dg.Definitions:
    names = list(project_config().targets)
    job = dg.define_asset_job(
        name=JOB_NAME,
        selection=dg.AssetSelection.assets(
            *[key for name in single_targets(names) for key in follow_up_keys(name)]
        ),
        description="Copy the newest backups to S3 and apply calendar retention.",
        tags=job_tags(JOB_NAME),
    )
    server_jobs = [
        dg.define_asset_job(
            name=server_job_name(JOB_NAME, name),
            selection=dg.AssetSelection.assets(*follow_up_keys(name)),
            description=f"Copy the newest backup of one database of {name} to S3 and apply "
            "its calendar retention.",
            tags=job_tags(JOB_NAME),
            partitions_def=database_partitions(name),
        )
        for name in server_targets()
    ]
    return dg.Definitions(
        jobs=[job, *server_jobs],
        sensors=[offsite_and_retention_sensor, *(build_server_sensor(n) for n in server_targets())],
    )
