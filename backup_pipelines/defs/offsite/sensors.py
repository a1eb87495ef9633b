"""After each new backup of a target: copy it offsite and apply retention (one run per backup).

The nightly job only takes the backups; ``offsite_and_retention_sensor`` follows every new
``<target>/logical_backup`` materialization with a run of ``<target>/offsite_copy`` (when
offsite copies are on) and ``<target>/backup_inventory``. A run that failed because S3 was down
is caught up by the next one.

One sensor watches every target: each tick reads the newest backup of all targets in one query
(``instance.get_asset_records``), so a thousand targets cost one tick, not a thousand. (It
replaced the per-target ``<target>_offsite_and_retention`` sensors.) Its cursor holds, per
target, the storage id of the newest backup already followed.
"""

import json

import dagster as dg

from backup_pipelines.lib.names import BACKUP_INVENTORY, LOGICAL_BACKUP, OFFSITE_COPY, target_key
from backup_pipelines.lib.project import offsite_enabled_targets, project_config
from backup_pipelines.lib.tags import TAG_KIND, job_tags, target_run_tags

JOB_NAME = "offsite_and_retention"
SENSOR_NAME = "offsite_and_retention_sensor"


def follow_up_keys(name: str) -> list[dg.AssetKey]:
    keys = [target_key(name, BACKUP_INVENTORY)]
    if name in offsite_enabled_targets():
        keys.insert(0, target_key(name, OFFSITE_COPY))
    return keys


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
    requests, cursor = follow_up_requests(
        context.instance, list(project_config().targets), context.cursor
    )
    context.update_cursor(cursor)
    return dg.SensorResult(run_requests=requests)


@dg.definitions
def offsite_sensors() -> dg.Definitions:
    job = dg.define_asset_job(
        name=JOB_NAME,
        selection=dg.AssetSelection.assets(
            *[key for name in project_config().targets for key in follow_up_keys(name)]
        ),
        description="Copy the newest backups to S3 and apply calendar retention.",
        tags=job_tags(JOB_NAME),
    )
    return dg.Definitions(jobs=[job], sensors=[offsite_and_retention_sensor])
