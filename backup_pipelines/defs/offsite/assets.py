"""``<target>/offsite_copy``: the newest backup (and any the last runs missed) copied to S3."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import BackupArtifact, load_artifact
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.offsite import UploadOutcome, offsite_storage, sync_offsite
from backup_pipelines.engine.storage import S3_RETRIES
from backup_pipelines.lib.names import LOGICAL_BACKUP, OFFSITE_COPY, OFFSITE_S3, target_key
from backup_pipelines.lib.partitions import database_partitions, partition_database
from backup_pipelines.lib.project import offsite_enabled_targets
from backup_pipelines.lib.results import each_selected_target, latest_materialized_path, user_error
from backup_pipelines.lib.tags import asset_attributes


def _description(name: str, settings: TargetSettings) -> str:
    offsite = settings.offsite
    where = (
        f"s3://{offsite.bucket or '$S3_BACKUP_BUCKET'}/"
        + "/".join(p for p in (offsite.prefix.strip("/"), name) if p)
        + ("/<database>" if settings.is_server else "")
    )
    return (
        f"Offsite copy of the newest **{name}** backup in `{where}/`, with its `.sha256` and "
        f"`.meta` (storage class {offsite.storage_class}, server-side encryption {offsite.sse}).\n\n"
        "Streams a multipart upload with SHA-256 checksums; the part size grows with the file so "
        "any size fits in S3's 10,000 parts. A copy already there with the same checksum is not "
        "uploaded again. Local backups a previous run could not upload (S3 down) are uploaded "
        "now; backups that failed verification never are.\n\n"
        "When S3 cannot be reached the local backup is kept and this step fails with the reason.\n\n"
        "Check: `offsite_copy_matches` compares the object's size and checksums with the local "
        "`.meta`."
    )


def _latest_local(context: dg.AssetExecutionContext, name: str) -> BackupArtifact | None:
    path = latest_materialized_path(context, target_key(name, LOGICAL_BACKUP))
    if path is None or not Path(path).exists():
        return None
    try:
        return load_artifact(path)
    except BackupPipelinesError:
        return None


def _metadata(outcome: UploadOutcome, uploaded: list[str], skipped: list[str]) -> dict:
    info = outcome.info
    put = outcome.put
    return {
        "path": dg.MetadataValue.path(str(outcome.artifact.path)),
        "url": dg.MetadataValue.url(outcome.url),
        "uploaded": dg.MetadataValue.bool(outcome.uploaded),
        "size_bytes": dg.MetadataValue.int(info.size),
        "sha256": dg.MetadataValue.text(outcome.artifact.meta.sha256),
        "s3_checksum_sha256": dg.MetadataValue.text(info.checksum_sha256 or ""),
        "parts": dg.MetadataValue.int(put.parts if put else 0),
        "part_size_bytes": dg.MetadataValue.int(put.part_size if put else 0),
        "storage_class": dg.MetadataValue.text(info.storage_class or "STANDARD"),
        "server_side_encryption": dg.MetadataValue.text(info.server_side_encryption or "none"),
        "encryption": dg.MetadataValue.text(outcome.artifact.meta.encryption.get("mode", "none")),
        "caught_up": dg.MetadataValue.json(uploaded),
        "not_uploaded_failed_verification": dg.MetadataValue.json(skipped),
    }


def _offsite_spec(name: str, settings: TargetSettings) -> dg.AssetSpec:
    return dg.AssetSpec(
        target_key(name, OFFSITE_COPY),
        deps=[target_key(name, LOGICAL_BACKUP)],
        partitions_def=database_partitions(name),
        description=_description(name, settings),
        **asset_attributes(name, "s3"),
    )


def copy_offsite(
    context: dg.AssetExecutionContext,
    name: str,
    database: str | None,
    backup_engine: BackupEngineResource,
    offsite_s3: S3Resource,
) -> dg.MaterializeResult:
    """Copy one target's newest backup (and any earlier runs missed) to S3: the materialization
    of ``<name>/offsite_copy``. Raises dg.Failure, keeping the local backups, when S3 fails."""
    try:
        target = backup_engine.project().target(name, database)
        storage = offsite_storage(target, client=offsite_s3.get_client())
        newest = _latest_local(context, name)
        report = sync_offsite(target, storage, first=newest, log=context.log)
    except BackupPipelinesError as exc:
        raise user_error(exc) from None
    if report.error is not None:
        kept = ", ".join(report.pending) or "(none)"
        raise dg.Failure(
            description=(
                f"offsite copy of '{name}' failed: {report.error}\n"
                f"The local backups are kept in {target.backup_dir} and the next run uploads "
                f"what is missing: {kept}"
            ),
            metadata={
                "pending_uploads": dg.MetadataValue.json(report.pending),
                "uploaded_before_the_error": dg.MetadataValue.json(
                    [o.url for o in report.uploaded]
                ),
                "local_backup_dir": dg.MetadataValue.path(str(target.backup_dir)),
            },
            allow_retries=False,
        )
    if not report.outcomes:
        raise user_error(
            BackupPipelinesError(
                f"{target.label} has no usable local backup to copy offsite",
                hint="materialize the logical_backup asset first",
            )
        )
    main = report.outcomes[0]
    caught_up = [o.url for o in report.outcomes[1:] if o.uploaded]
    if caught_up:
        context.log.info(f"Caught up {len(caught_up)} backup(s) missing offsite: {caught_up}")
    return dg.MaterializeResult(
        asset_key=target_key(name, OFFSITE_COPY),
        metadata=_metadata(main, caught_up, report.skipped_failed),
    )


def build_offsite_copy(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    """The offsite copy of a server target (``databases: all``): partitioned by database."""

    @dg.multi_asset(name=f"{name}__offsite_copy", specs=[_offsite_spec(name, settings)])
    def offsite_copy(
        context: dg.AssetExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> dg.MaterializeResult:
        return copy_offsite(context, name, partition_database(context), backup_engine, offsite_s3)

    return offsite_copy


def build_offsite_copies(targets: dict[str, TargetSettings]) -> dg.AssetsDefinition:
    """The offsite copies of every single-database target with copies, as one op that makes
    whichever of them a run selects (one definition to load for a thousand targets). A target
    whose upload fails does not stop the others; the step fails at the end, naming it."""

    @dg.multi_asset(
        name=OFFSITE_COPY,
        specs=[_offsite_spec(name, settings) for name, settings in targets.items()],
        can_subset=True,
    )
    def offsite_copy(
        context: dg.AssetExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> Iterator[dg.MaterializeResult]:
        yield from each_selected_target(
            context,
            lambda name: copy_offsite(context, name, None, backup_engine, offsite_s3),
            "offsite copy",
        )

    return offsite_copy


def _offsite_assets(targets: dict[str, TargetSettings]) -> list[dg.AssetsDefinition]:
    single = {name: settings for name, settings in targets.items() if not settings.is_server}
    return [
        *([build_offsite_copies(single)] if single else []),
        *(build_offsite_copy(n, s) for n, s in targets.items() if s.is_server),
    ]


@dg.definitions
def offsite_assets() -> dg.Definitions:
    return dg.Definitions(
        assets=_offsite_assets(offsite_enabled_targets()),
        # Always defined: backup_inventory uses it too. Credentials, region and endpoint come from
        # the standard AWS_* environment (AWS_ENDPOINT_URL_S3 for S3-compatible stores).
        # The engine's one retry policy (engine/storage/retry.py): botocore retries each
        # request, S3_RETRIES times after the first try; the engine adds no loop around it.
        resources={OFFSITE_S3: S3Resource(max_attempts=S3_RETRIES)},
    )
