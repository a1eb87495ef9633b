"""``offsite_copy_matches``: the S3 copy is still there, whole, and the same bytes as the backup."""

from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import load_artifact
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.offsite import check_offsite_copy, offsite_storage
from backup_pipelines.lib.names import OFFSITE_COPY, target_key
from backup_pipelines.lib.project import offsite_enabled_targets
from backup_pipelines.lib.results import PARTITION_TAG, failure, latest_materialized_path


def build_offsite_check(name: str) -> dg.AssetChecksDefinition:
    key = target_key(name, OFFSITE_COPY)

    @dg.asset_check(
        asset=key,
        name="offsite_copy_matches",
        description=(
            "The newest offsite copy exists in S3 with the size and SHA-256 recorded in the local "
            "`.meta`, S3's own checksum matches the local file, and its `.sha256` and `.meta` are "
            "there. Fails when the object was deleted, truncated or replaced."
        ),
    )
    def offsite_copy_matches(
        context: dg.AssetCheckExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> dg.AssetCheckResult:
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
        metadata: dict[str, Any] = {
            "path": dg.MetadataValue.path(path),
            "result": outcome.message,
        }
        metadata.update(
            {k: v for k, v in outcome.details.items() if isinstance(v, int | float | str)}
        )
        return dg.AssetCheckResult(
            passed=outcome.passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
        )

    return offsite_copy_matches


@dg.definitions
def offsite_checks() -> dg.Definitions:
    return dg.Definitions(asset_checks=[build_offsite_check(n) for n in offsite_enabled_targets()])
