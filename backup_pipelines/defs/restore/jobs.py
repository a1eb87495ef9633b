"""``restore_database``: replace a target's database with a backup, launched from the Launchpad.

A thin shell over ``engine.restore.restore_database``: the same confirmation, integrity check,
safety backup, restore into a new database, row-count check and swap as
``backup-pipelines restore``.
"""

import dagster as dg
from pydantic import Field

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.confirm import ConfirmationError
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.restore import RestoreReport, RestoreStepError, restore_database
from backup_pipelines.lib.tags import job_tags

RESTORE_OP = "restore_from_backup"


class RestoreDatabaseConfig(dg.Config):
    """What to restore where. Launchpad: ops.restore_from_backup.config."""

    backup: str = Field(
        description="The backup: a file under the backup root, an s3:// location of an offsite "
        "copy, or 'latest' (the target's newest backup, safety backups excluded).",
    )
    target: str = Field(description="Target whose database is replaced, e.g. staging.")
    database: str | None = Field(
        default=None,
        description="For a server target (databases: all): which of its databases is replaced "
        "(required there); leave empty for a single-database target.",
    )
    confirm: str | None = Field(
        default=None,
        description="Type the target name again to confirm. Without a matching value the run "
        "fails and nothing is touched.",
    )
    allow_other_database: bool = Field(
        default=False,
        description="Allow a backup taken of another target/database (e.g. production into staging).",
    )


def _refuse_without_terminal(question: str) -> str:
    # A run has no terminal to ask on; a worker that inherited one must not block on input().
    raise ConfirmationError(
        "refusing to restore without confirmation; nothing was touched",
        hint=f"set ops.{RESTORE_OP}.config.confirm to the target name in the run config",
    )


def report_metadata(report: RestoreReport) -> dict[str, dg.MetadataValue]:
    steps = [
        dg.TableRecord({"step": step, "seconds": round(seconds, 3)})
        for step, seconds in report.step_seconds.items()
    ]
    metadata: dict[str, dg.MetadataValue] = {
        "target": dg.MetadataValue.text(report.target),
        "database": dg.MetadataValue.text(report.database),
        "server": dg.MetadataValue.text(report.server),
        "backup": dg.MetadataValue.text(report.backup),
        "backup_taken_at": dg.MetadataValue.text(report.backup_taken_at.isoformat()),
        "safety_backup": dg.MetadataValue.text(
            report.safety_backup or "(none: database did not exist)"
        ),
        "previous_database": dg.MetadataValue.text(
            (report.previous_database or "(none)")
            + (" (dropped)" if report.previous_dropped else "")
        ),
        "tables": dg.MetadataValue.int(report.tables),
        "rows": dg.MetadataValue.int(report.rows),
        "terminated_sessions": dg.MetadataValue.int(report.terminated_sessions),
        "roles_created": dg.MetadataValue.text(", ".join(report.roles_created) or "(none)"),
        "duration_seconds": dg.MetadataValue.float(report.duration_seconds),
        "steps": dg.MetadataValue.table(
            steps,
            schema=dg.TableSchema(
                columns=[dg.TableColumn("step", "string"), dg.TableColumn("seconds", "float")]
            ),
        ),
    }
    return metadata


@dg.op(
    name=RESTORE_OP,
    out=dg.Out(dg.Nothing),
    description="Check the confirmation, verify the backup (checksum, decryption, "
    "decompression), take a pre-restore safety backup, restore into a new database, compare "
    "every table's row count with the backup's .meta, then block connections, terminate "
    "sessions and swap the names (the replaced database is kept renamed). Any failure leaves "
    "the live database as it was and names the failed step and the safety backup.",
    tags={"kind": "restore"},
)
def restore_database_op(
    context: dg.OpExecutionContext,
    config: RestoreDatabaseConfig,
    backup_engine: BackupEngineResource,
) -> dg.Output:
    try:
        report = restore_database(
            backup_engine.project(),
            config.target,
            config.backup,
            confirm=config.confirm,
            log=context.log,
            prompt=_refuse_without_terminal,
            allow_other_database=config.allow_other_database,
            database=config.database,
        )
    except RestoreStepError as exc:
        raise dg.Failure(
            description=str(exc),
            metadata={
                "failed_step": dg.MetadataValue.text(exc.step),
                "safety_backup": dg.MetadataValue.text(exc.safety_backup or "(none taken)"),
            },
            allow_retries=False,
        ) from None
    except BackupPipelinesError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    context.log.info(report.summary())
    return dg.Output(None, metadata=report_metadata(report))


@dg.job(
    name="restore_database",
    description="Replace a target's database with a backup (local file, s3:// offsite copy or "
    "'latest'), safely: nothing is touched without `confirm: <target>`, and any failure leaves "
    "the live database as it was. Same engine as `backup-pipelines restore`. Its runs carry "
    "the target's tag, so a restore waits for a running backup of the same target.",
    tags=job_tags("restore"),
)
def restore_database_job() -> None:
    restore_database_op()


@dg.definitions
def restore_jobs() -> dg.Definitions:
    return dg.Definitions(jobs=[restore_database_job])
