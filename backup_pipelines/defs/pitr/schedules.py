"""Weekly base backups (then their offsite copy) and weekly PITR drills, per target cadence.

``schedules: {base_backup: ..., pitr_drill: ...}`` in a target overrides the defaults: base
backups on the ``weekly`` cadence (Sunday 03:00) and drills on Sunday 05:00, after the backup.
"""

import dagster as dg

from backup_pipelines.lib.cadences import build_cadence_schedules
from backup_pipelines.lib.names import BASE_BACKUP, BASE_BACKUP_OFFSITE, PITR_DRILL
from backup_pipelines.lib.project import pitr_targets

DEFAULT_BASE_BACKUP_CADENCES = ("weekly",)
DEFAULT_PITR_DRILL_CADENCES = ("0 5 * * 0",)


@dg.definitions
def pitr_schedules() -> dg.Definitions:
    targets = list(pitr_targets())
    if not targets:
        return dg.Definitions()
    return dg.Definitions(
        schedules=[
            *build_cadence_schedules(
                kind="base_backup",
                asset_names=[BASE_BACKUP, BASE_BACKUP_OFFSITE],
                default_cadences=DEFAULT_BASE_BACKUP_CADENCES,
                targets=targets,
                description="Base backup for point-in-time recovery, then its offsite copy",
            ),
            *build_cadence_schedules(
                kind="pitr_drill",
                asset_names=[PITR_DRILL],
                default_cadences=DEFAULT_PITR_DRILL_CADENCES,
                targets=targets,
                description="Point-in-time recovery drill",
            ),
        ]
    )
