"""``offsite_copy_matches``: the S3 copy is still there, whole, and the same bytes as the backup."""

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import load_artifact
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.offsite import CHECK_NAME, check_offsite_copy, offsite_storage
from backup_pipelines.lib.names import OFFSITE_COPY, target_key
from backup_pipelines.lib.project import offsite_enabled_targets
from backup_pipelines.lib.results import PARTITION_TAG, failure, latest_materialized_path


def _offsite_check_spec(name: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        CHECK_NAME,
        asset=target_key(name, OFFSITE_COPY),
        description=(
            "The newest offsite copy exists in S3 with the size and SHA-256 recorded in the local "
            "`.meta`, S3's own checksum matches the local file, and its `.sha256` and `.meta` are "
            "there. Fails when the object was deleted, truncated or replaced."
        ),
    )


def check_offsite(
    context: dg.AssetCheckExecutionContext,
    name: str,
    backup_engine: BackupEngineResource,
    offsite_s3: S3Resource,
) -> dg.AssetCheckResult:
    """``offsite_copy_matches`` of one target (in a partition run: of that database)."""
    key = target_key(name, OFFSITE_COPY)
    path = latest_materialized_path(context, key)
    if path is None:
        return failure("no offsite copy has been made yet: materialize offsite_copy first")
    try:
        artifact = load_artifact(path)
        target = backup_engine.project().target(name, context.run.tags.get(PARTITION_TAG))
        storage = offsite_storage(target, client=offsite_s3.get_client())
    except BackupPipelinesError as exc:
        return failure(
            f"cannot check the offsite copy of {path}: {exc.message}",
            path=dg.MetadataValue.path(path),
        )
    outcome = check_offsite_copy(artifact, storage)
    metadata: dict[str, Any] = {"path": dg.MetadataValue.path(path), "result": outcome.message}
    metadata.update({k: v for k, v in outcome.details.items() if isinstance(v, int | float | str)})
    return dg.AssetCheckResult(
        passed=outcome.passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )


def build_offsite_checks(op_name: str, names: list[str]) -> dg.AssetChecksDefinition:
    """``offsite_copy_matches`` of the given targets as one op (one definition to load for all
    single-database targets), each check runnable alone."""

    @dg.multi_asset_check(
        name=op_name,
        specs=[_offsite_check_spec(name) for name in names],
        can_subset=True,
        description="Checks the newest offsite copy in S3 against the local backup.",
    )
    def offsite_copy_checks(
        context: dg.AssetCheckExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> Iterator[dg.AssetCheckResult]:
        for check in sorted(
            context.selected_asset_check_keys, key=lambda c: c.asset_key.to_user_string()
        ):
            name = check.asset_key.path[0]
            try:
                result = check_offsite(context, name, backup_engine, offsite_s3)
            except Exception as exc:  # one target's broken check must not silence the others'
                context.log.exception(f"checking the offsite copy of {name} failed")
                result = failure(f"the check could not run: {type(exc).__name__}: {exc}")
            yield result._replace(asset_key=check.asset_key, check_name=CHECK_NAME)

    return offsite_copy_checks


@dg.definitions
def offsite_checks() -> dg.Definitions:
    targets: dict[str, TargetSettings] = offsite_enabled_targets()
    single = [name for name, settings in targets.items() if not settings.is_server]
    return dg.Definitions(
        asset_checks=[
            # Server targets' copies are partitioned by database: each keeps its own op.
            *(
                build_offsite_checks(f"{name}__offsite_copy_checks", [name])
                for name, settings in targets.items()
                if settings.is_server
            ),
            *([build_offsite_checks("offsite_copy_checks", single)] if single else []),
        ]
    )
