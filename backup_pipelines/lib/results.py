"""What assets and checks hand back to Dagster: failures with the engine's message, and the
backup file a materialization recorded."""

from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg

from backup_pipelines.engine.errors import BackupPipelinesError


def latest_materialized_path(
    context: dg.AssetCheckExecutionContext | dg.AssetExecutionContext, key: dg.AssetKey
) -> str | None:
    """The backup file the newest materialization of ``key`` recorded, if any; in a run of one
    partition (a database of a server target), the newest materialization of that partition."""
    partition = context.run.tags.get(PARTITION_TAG)
    if partition is None:
        event = context.instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event is not None else None
    else:
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        ).records
        materialization = records[0].asset_materialization if records else None
    if materialization is None:
        return None
    value = materialization.metadata.get("path")
    return str(value.value) if value is not None else None


# The run tag Dagster puts on a run of one partition.
PARTITION_TAG = "dagster/partition"


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


def each_selected_target(
    context: dg.AssetExecutionContext,
    work: Callable[[str], dg.MaterializeResult],
    what: str,
) -> Iterator[dg.MaterializeResult]:
    """Run ``work`` for the target of each asset the run selected from an op shared by many
    targets, in name order. One target's failure does not stop the others': it is logged, and
    the step fails at the end naming every failed target. A run for a single target raises that
    target's own failure, metadata included."""
    selected = sorted(context.selected_asset_keys, key=lambda k: k.to_user_string())
    failed: list[tuple[str, str]] = []
    for key in selected:
        name = key.path[0]
        try:
            yield work(name)
        except dg.Failure as exc:
            if len(selected) == 1:
                raise
            context.log.error(f"{name}: {exc.description}")
            failed.append((name, exc.description or "failed"))
        except Exception as exc:  # a bug must not stop the other targets' work
            context.log.exception(f"{name}: {what} failed")
            failed.append((name, f"{type(exc).__name__}: {exc}"))
    if failed:
        raise dg.Failure(
            description=f"{what} failed for {len(failed)} of {len(selected)} targets (the "
            "others were done): " + "; ".join(f"{name}: {reason}" for name, reason in failed),
            allow_retries=False,
        )
