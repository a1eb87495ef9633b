"""``rollback_migrations``: undo the last N drizzle migrations of a target, launched from the UI.

The job is a thin shell over ``engine.migrations``: the same plan, confirmation, safety backup,
single-transaction rollback and verification as ``backup-pipelines rollback``.
"""

import dagster as dg
from pydantic import Field

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.confirm import ConfirmationError
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.migrations.errors import RollbackFailedError
from backup_pipelines.engine.migrations.plan import HistoryEntry, RollbackPlan, plan_rollback
from backup_pipelines.engine.migrations.rollback import RollbackResult, execute_rollback
from backup_pipelines.lib.results import user_error
from backup_pipelines.lib.tags import job_tags

ROLLBACK_OP = "roll_back_migrations"


class RollbackMigrationsConfig(dg.Config):
    """What to roll back. Launchpad: ops.roll_back_migrations.config."""

    target: str = Field(description="Target name from the targets file, e.g. staging.")
    steps: int = Field(description="How many of the most recently applied migrations to undo.")
    confirm: str | None = Field(
        default=None,
        description="Type the target name again to confirm. Without it the run only plans "
        "and refuses; nothing is touched.",
    )
    dry_run: bool = Field(
        default=False, description="Only plan: show what would be rolled back and stop."
    )


def _refuse_without_terminal(question: str) -> str:
    # A run has no terminal to ask on; a worker that inherited one must not block on input().
    raise ConfirmationError(
        "refusing to roll back migrations without confirmation; nothing was touched",
        hint=f"set ops.{ROLLBACK_OP}.config.confirm to the target name in the run config",
    )


def _history_table(entries: list[HistoryEntry], rolled_back: set[int]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        [
            dg.TableRecord(
                {
                    "id": entry.id,
                    "migration": entry.label(),
                    "created_at": str(entry.created_at),
                    "state": "rolled back" if entry.id in rolled_back else "applied",
                }
            )
            for entry in entries
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("id", "int"),
                dg.TableColumn("migration", "string"),
                dg.TableColumn("created_at", "string"),
                dg.TableColumn("state", "string"),
            ]
        ),
    )


def plan_metadata(plan: RollbackPlan) -> dict[str, dg.MetadataValue]:
    rolled_back = {step.applied.id for step in plan.steps}
    return {
        "target": dg.MetadataValue.text(plan.target),
        "database": dg.MetadataValue.text(plan.database),
        "tracking_table": dg.MetadataValue.text(str(plan.table)),
        "plan": dg.MetadataValue.md(f"```\n{plan.describe()}\n```"),
        "applied_before": dg.MetadataValue.int(len(plan.applied)),
        "last_before": dg.MetadataValue.text(plan.last_before or "(none)"),
        "rolled_back": dg.MetadataValue.md(
            "\n".join(f"- `{step.tag}`" for step in plan.steps) or "(none)"
        ),
        "history": _history_table(plan.applied, rolled_back),
    }


def result_metadata(result: RollbackResult) -> dict[str, dg.MetadataValue]:
    return {
        **plan_metadata(result.plan),
        "applied_after": dg.MetadataValue.int(len(result.after)),
        "last_after": dg.MetadataValue.text(result.after[-1].label() if result.after else "(none)"),
        "verified": dg.MetadataValue.bool(True),
        "safety_backup": dg.MetadataValue.path(str(result.backup.path)),
        "duration_seconds": dg.MetadataValue.float(result.duration_seconds),
    }


@dg.op(
    name=ROLLBACK_OP,
    out=dg.Out(dg.Nothing),
    description="Plan the rollback (refusing unsafe plans), require confirmation, take a "
    "pre-rollback safety backup, run the down migrations newest first and delete their rows "
    "in one transaction, then verify the tracking table ends at the expected migration.",
)
def roll_back_migrations(
    context: dg.OpExecutionContext,
    config: RollbackMigrationsConfig,
    backup_engine: BackupEngineResource,
) -> dg.Output:
    plan: RollbackPlan | None = None
    try:
        target = backup_engine.target(config.target)
        plan = plan_rollback(target, config.steps)
        context.log.info(plan.describe())
        if config.dry_run:
            return dg.Output(
                None, metadata={**plan_metadata(plan), "dry_run": dg.MetadataValue.bool(True)}
            )
        result = execute_rollback(
            target,
            plan,
            confirm=config.confirm,
            prompt=_refuse_without_terminal,
            log=context.log,
        )
    except BackupPipelinesError as exc:
        metadata: dict[str, dg.MetadataValue] = plan_metadata(plan) if plan else {}
        if isinstance(exc, RollbackFailedError):
            if exc.safety_backup is not None:
                metadata["safety_backup"] = dg.MetadataValue.path(str(exc.safety_backup))
            if exc.failed_migration:
                metadata["failed_migration"] = dg.MetadataValue.text(exc.failed_migration)
        raise user_error(exc, metadata) from None
    return dg.Output(None, metadata=result_metadata(result))


@dg.job(
    name="rollback_migrations",
    description="Roll back the last N schema migrations (drizzle) of one target after a "
    "safety backup, all in one transaction. Run config: target, steps, confirm (the target "
    "name again), dry_run. A failed down migration changes nothing and names the migration, "
    "the database error and the safety backup. Its runs carry the target's tag, so a "
    "rollback waits for a running backup or restore of the same target.",
    tags=job_tags("migration_rollback"),
)
def rollback_migrations() -> None:
    roll_back_migrations()


@dg.definitions
def migration_jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[rollback_migrations])
