"""Scheduled backups: daily at 02:00 and hourly for high-traffic targets (the guide's cron lines).

Cadences are per target in ``backup_targets.yaml`` (``schedules.backup``, ``high_traffic``); see
``lib/cadences.py``. A high-traffic target's daily and hourly backups are one schedule
(``daily_and_hourly_backup_schedule``), which runs once at 02:00. Every schedule is RUNNING by
default and requests one run per target, so one failing database never hides another. The
weekly Sunday 03:00 backup runs together with the restore drill
(``weekly_restore_drill_schedule``), so the drill always tests a fresh backup.
"""

import dagster as dg

from backup_pipelines.lib.cadences import BACKUP_KIND, build_cadence_schedules
from backup_pipelines.lib.names import LOGICAL_BACKUP, target_key
from backup_pipelines.lib.partitions import single_targets
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.tags import job_tags

LOGICAL_BACKUPS_JOB = "logical_backups"
DEFAULT_BACKUP_CADENCES = ("daily",)


@dg.definitions
def backup_schedules() -> dg.Definitions:
    job = dg.define_asset_job(
        name=LOGICAL_BACKUPS_JOB,
        selection=dg.AssetSelection.assets(
            *[target_key(n, LOGICAL_BACKUP) for n in single_targets(list(project_config().targets))]
        ),
        description="Back up every selected target with pg_dump and run the integrity checks.",
        tags=job_tags(BACKUP_KIND),
    )
    return dg.Definitions(
        jobs=[job],
        schedules=build_cadence_schedules(
            kind=BACKUP_KIND,
            asset_names=[LOGICAL_BACKUP],
            default_cadences=DEFAULT_BACKUP_CADENCES,
            job_name=LOGICAL_BACKUPS_JOB,
            description="Logical backup (pg_dump) with its integrity checks",
        ),
    )
