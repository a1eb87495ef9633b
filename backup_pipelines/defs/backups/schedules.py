"""The nightly backup: one run per target at 02:00 (the guide's cron line), RUNNING by default."""


import dagster as dg

from backup_pipelines.defs.shared import LOGICAL_BACKUP, project_config, target_key

logical_backups_job = dg.define_asset_job(
    name="logical_backups",
    selection=dg.AssetSelection.assets(*[target_key(n, LOGICAL_BACKUP) for n in project_config().targets]),
    description="Back up every selected target with pg_dump and run the integrity checks.",
)


@dg.schedule(
    job=logical_backups_job,
    cron_schedule="0 2 * * *",
    execution_timezone=project_config().timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily backup of every target at 02:00, one run per target so one failure "
    "never hides another.",
)
def daily_backup_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    moment = context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M")
    return [
        dg.RunRequest(
            run_key=f"daily-{name}-{moment}",
            asset_selection=[target_key(name, LOGICAL_BACKUP)],
            tags={"target": name, "cadence": "daily"},
        )
        for name in project_config().targets
    ]
