"""Scheduled backups: daily at 02:00 and hourly for high-traffic targets (the guide's cron lines).

Cadences are per target in ``backup_targets.yaml`` (``schedules.backup``, ``high_traffic``); see
``defs/cadences.py``. Every schedule is RUNNING by default and requests one run per target, so one
failing database never hides another. The weekly Sunday 03:00 backup runs together with the
restore drill (``weekly_restore_drill_schedule``), so the drill always tests a fresh backup.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from backup_pipelines.defs.cadences import BACKUP_KIND, build_cadence_schedules
from backup_pipelines.defs.shared import LOGICAL_BACKUP, project_config, target_key

DEFAULT_BACKUP_CADENCES = ("daily",)


def build_logical_backups_job() -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name="logical_backups",
        selection=dg.AssetSelection.assets(
            *[target_key(n, LOGICAL_BACKUP) for n in project_config().targets]
        ),
        description="Back up every selected target with pg_dump and run the integrity checks.",
    )


@dg.definitions
def backup_schedules() -> dg.Definitions:
    job = build_logical_backups_job()
    return dg.Definitions(
        jobs=[job],
        schedules=build_cadence_schedules(
            kind=BACKUP_KIND,
            asset_names=[LOGICAL_BACKUP],
            default_cadences=DEFAULT_BACKUP_CADENCES,
            job=job,
            description="Logical backup (pg_dump) with its integrity checks",
        ),
    )
