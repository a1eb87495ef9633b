"""The weekly backup + restore drill: Sunday 03:00 (the guide's `backup-database.sh --test`
cron line), RUNNING by default. The backup and its drill run together, so the drill always
proves the backup just taken.

Per target, ``schedules: {restore_drill: ...}`` in the targets file picks other cadences or
turns the drill off; each tick requests one run per target.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from backup_pipelines.defs.cadences import build_cadence_schedules
from backup_pipelines.defs.restore.assets import RESTORE_DRILL
from backup_pipelines.defs.shared import LOGICAL_BACKUP, project_config, target_key

RESTORE_DRILL_KIND = "restore_drill"
DEFAULT_DRILL_CADENCES = ("weekly",)


def build_restore_drills_job() -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name="restore_drills",
        selection=dg.AssetSelection.assets(
            *[
                target_key(n, name)
                for n in project_config().targets
                for name in (LOGICAL_BACKUP, RESTORE_DRILL)
            ]
        ),
        description="Back up each selected target, then restore the newest backup into a scratch "
        "database and check it (row counts, amcheck, RTO).",
    )


@dg.definitions
def restore_drill_schedules() -> dg.Definitions:
    job = build_restore_drills_job()
    return dg.Definitions(
        jobs=[job],
        schedules=build_cadence_schedules(
            kind=RESTORE_DRILL_KIND,
            asset_names=[LOGICAL_BACKUP, RESTORE_DRILL],
            default_cadences=DEFAULT_DRILL_CADENCES,
            job=job,
            description="Weekly backup and restore drill of that backup",
        ),
    )
