"""After each new backup of a target: copy it offsite and apply retention (one run per backup).

The nightly job only takes the backups; this sensor follows every new ``<target>/logical_backup``
materialization with a run of ``<target>/offsite_copy`` (when offsite copies are on) and
``<target>/backup_inventory``. A run that failed because S3 was down is caught up by the next one.
"""

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


def follow_up_keys(name: str) -> list[dg.AssetKey]:
    keys = [target_key(name, BACKUP_INVENTORY)]
    if name in offsite_enabled_targets():
        keys.insert(0, target_key(name, OFFSITE_COPY))
    return keys


def build_sensor(name: str) -> dg.SensorDefinition:
    keys = follow_up_keys(name)
    server = database_partitions(name) is not None

    @dg.asset_sensor(
        asset_key=target_key(name, LOGICAL_BACKUP),
        job_name=server_job_name(JOB_NAME, name) if server else JOB_NAME,
        name=f"{name}_offsite_and_retention",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=f"After each new backup of {name}: "
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
            # A server target: the database (partition) the backup was of.
            partition_key=asset_event.dagster_event.partition
            if server and asset_event.dagster_event
            else None,
            # The same limits as the backup itself: one run per target, per server.
            tags={**target_run_tags(name), TAG_KIND: JOB_NAME},
        )

    return follow_backup


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
    return dg.Definitions(jobs=[job, *server_jobs], sensors=[build_sensor(name) for name in names])
