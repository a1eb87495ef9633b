"""What assets and checks hand back to Dagster: failures with the engine's message, and the
backup file a materialization recorded."""

from typing import Any

import dagster as dg

from backup_pipelines.engine.errors import BackupPipelinesError


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
    message: str, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR, **metadata: Any
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, severity=severity, metadata={"reason": message, **metadata}
    )


def user_error(
    exc: BackupPipelinesError, metadata: dict[str, dg.MetadataValue] | None = None
) -> dg.Failure:
    """A run failure whose description is the engine's actionable message (no stack trace)."""
    return dg.Failure(description=str(exc), metadata=metadata, allow_retries=False)
