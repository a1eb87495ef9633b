"""The weekly backup + restore drill: Sunday 03:00 (the guide's `backup-database.sh --test`
cron line), RUNNING by default. The backup and its drill run together, so the drill always
proves the backup just taken.

Per target, ``schedules: {restore_drill: ...}`` in the targets file picks other cadences or
turns the drill off; each tick requests one run per target.
"""

import dagster as dg

from backup_pipelines.lib.cadences import build_cadence_schedules
from backup_pipelines.lib.names import LOGICAL_BACKUP, RESTORE_DRILL, target_key
from backup_pipelines.lib.partitions import single_targets
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.tags import job_tags

RESTORE_DRILL_KIND = "restore_drill"
RESTORE_DRILLS_JOB = "restore_drills"
DEFAULT_DRILL_CADENCES = ("weekly",)


@dg.definitions
def restore_drill_schedules() -> dg.Definitions:
    job = dg.define_asset_job(
        name=RESTORE_DRILLS_JOB,
        selection=dg.AssetSelection.assets(
            *[
                target_key(n, name)
                for n in single_targets(list(project_config().targets))
                for name in (LOGICAL_BACKUP, RESTORE_DRILL)
            ]
        ),
        description="Back up each selected target, then restore the newest backup into a scratch "
        "database and check it (row counts, amcheck, RTO).",
        tags=job_tags(RESTORE_DRILL_KIND),
    )
    return dg.Definitions(
        jobs=[job],
        schedules=build_cadence_schedules(
            kind=RESTORE_DRILL_KIND,
            asset_names=[LOGICAL_BACKUP, RESTORE_DRILL],
            default_cadences=DEFAULT_DRILL_CADENCES,
            job_name=RESTORE_DRILLS_JOB,
            description="Weekly backup and restore drill of that backup",
        ),
    )
