"""The weekly restore drill: Sunday 03:00 (the guide's weekly test), RUNNING by default.

Per target, ``schedules: {restore_drill: ...}`` in the targets file picks other cadences or
turns the drill off; each tick requests one run per target.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from backup_pipelines.defs.cadences import build_cadence_schedules
from backup_pipelines.defs.restore.assets import RESTORE_DRILL
from backup_pipelines.defs.shared import project_config, target_key

RESTORE_DRILL_KIND = "restore_drill"
DEFAULT_DRILL_CADENCES = ("weekly",)


def build_restore_drills_job() -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name="restore_drills",
        selection=dg.AssetSelection.assets(
            *[target_key(n, RESTORE_DRILL) for n in project_config().targets]
        ),
        description="Restore the newest backup of each selected target into a scratch database "
        "and check it (row counts, amcheck, RTO).",
    )


@dg.definitions
def restore_drill_schedules() -> dg.Definitions:
    job = build_restore_drills_job()
    return dg.Definitions(
        jobs=[job],
        schedules=build_cadence_schedules(
            kind=RESTORE_DRILL_KIND,
            asset_names=[RESTORE_DRILL],
            default_cadences=DEFAULT_DRILL_CADENCES,
            job=job,
            description="Restore drill of the newest backup",
        ),
    )
