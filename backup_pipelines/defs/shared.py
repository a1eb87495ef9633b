"""Helpers every area of the Dagster layer uses to talk about targets and their backups."""

from functools import cache

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string

from backup_pipelines.engine.config import ProjectConfig, load_config
from backup_pipelines.engine.errors import BackupPipelinesError

LOGICAL_BACKUP = "logical_backup"
OFFSITE_COPY = "offsite_copy"
BACKUP_INVENTORY = "backup_inventory"
# Resource key of the dagster-aws S3Resource used for offsite copies.
OFFSITE_S3 = "offsite_s3"


@cache
def project_config() -> ProjectConfig:
    """The targets file as it was when the definitions loaded (decides which assets exist).

    A target with invalid settings is left out of ``targets`` (its problems are in
    ``broken_targets`` and shown by a placeholder asset), so it never stops the code location
    or the other targets' assets, checks, jobs and schedules.
    """
    return set_aside_unschedulable(load_config(isolate_targets=True))


def set_aside_unschedulable(config: ProjectConfig) -> ProjectConfig:
    """Move targets with a cadence Dagster's own cron parser rejects to ``broken_targets``.

    The targets file is validated with the same parser, so this never happens unless the two
    disagree; if they ever do, only that target loses its schedules, not the code location.
    """
    rejected: dict[str, list[str]] = {}
    for name, settings in config.targets.items():
        for kind, cadences in settings.schedules.items():
            for cadence in cadences:
                cron = config.cadence_cron(cadence)
                if not is_valid_cron_string(cron):
                    rejected.setdefault(name, []).append(
                        f"target '{name}', field 'schedules.{kind}': {cron!r} is not a cron "
                        "string Dagster's scheduler accepts"
                    )
    if not rejected:
        return config
    return config.model_copy(
        update={
            "targets": {n: s for n, s in config.targets.items() if n not in rejected},
            "broken_targets": {
                **config.broken_targets,
                **{n: "\n".join(lines) for n, lines in rejected.items()},
            },
        }
    )


def target_key(target: str, name: str) -> dg.AssetKey:
    return dg.AssetKey([target, name])


def latest_materialized_path(
    context: dg.AssetCheckExecutionContext | dg.AssetExecutionContext, key: dg.AssetKey
) -> str | None:
    """The backup file the newest materialization of ``key`` recorded, if any."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("path")
    return str(value.value) if value is not None else None


def failure(
    message: str, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR, **metadata: object
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, severity=severity, metadata={"reason": message, **metadata}
    )


def user_error(
    exc: BackupPipelinesError, metadata: dict[str, dg.MetadataValue] | None = None
) -> dg.Failure:
    """A run failure whose description is the engine's actionable message (no stack trace)."""
    return dg.Failure(description=str(exc), metadata=metadata, allow_retries=False)
