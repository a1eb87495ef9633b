"""Integrity checks on each ``<target>/logical_backup``: they turn red in the UI when a backup
file is tampered with, truncated or suspiciously small."""

from typing import Any

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import BackupArtifact, list_artifacts, load_artifact
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.listing import human_size
from backup_pipelines.engine.verify import (
    CheckOutcome,
    check_checksum,
    check_globals,
    check_readable,
)
from backup_pipelines.lib.names import LOGICAL_BACKUP, target_key
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.results import failure, latest_materialized_path


def _latest_artifact(
    context: dg.AssetCheckExecutionContext, key: dg.AssetKey
) -> BackupArtifact | dg.AssetCheckResult:
    path = latest_materialized_path(context, key)
    if path is None:
        return failure("no backup has been materialized yet: materialize the backup asset first")
    try:
        return load_artifact(path)
    except BackupPipelinesError as exc:
        return failure(
            f"the latest backup cannot be opened: {exc.message}", path=dg.MetadataValue.path(path)
        )


def _result(
    artifact: BackupArtifact, outcome: CheckOutcome, severity: dg.AssetCheckSeverity
) -> dg.AssetCheckResult:
    # Recorded in .meta like `backup-pipelines verify` does, so `list`, retention and
    # `restore latest` see the result too.
    metadata: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(artifact.path)),
        "result": outcome.message,
    }
    try:
        artifact.record_check(outcome.name, outcome.passed, outcome.message)
    except BackupPipelinesError as exc:
        # The check's verdict on the file stands; say that the .meta does not know it.
        metadata["not_recorded"] = exc.message
    metadata.update({k: v for k, v in outcome.details.items() if isinstance(v, int | float | str)})
    return dg.AssetCheckResult(passed=outcome.passed, severity=severity, metadata=metadata)


def build_backup_checks(name: str, settings: TargetSettings) -> list[dg.AssetChecksDefinition]:
    key = target_key(name, LOGICAL_BACKUP)

    @dg.asset_check(
        asset=key,
        name="checksum_matches",
        blocking=True,
        description="Recomputes the backup file's SHA-256 and compares it with its `.sha256` and `.meta`. "
        "Fails (and stops downstream steps) when the file was modified, truncated or replaced.",
    )
    def checksum_matches(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        artifact = _latest_artifact(context, key)
        if isinstance(artifact, dg.AssetCheckResult):
            return artifact
        return _result(artifact, check_checksum(artifact), dg.AssetCheckSeverity.ERROR)

    @dg.asset_check(
        asset=key,
        name="archive_readable",
        description="Decompresses (and decrypts) the whole backup: a plain dump must end with pg_dump's "
        "'dump complete' trailer, a custom archive must list and decode every data block.",
    )
    def archive_readable(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        artifact = _latest_artifact(context, key)
        if isinstance(artifact, dg.AssetCheckResult):
            return artifact
        return _result(artifact, check_readable(artifact), dg.AssetCheckSeverity.ERROR)

    @dg.asset_check(
        asset=key,
        name="globals_readable",
        description="The server's globals stored with the backup (roles, memberships, role "
        "settings) are there, match their checksum and decode to pg_dumpall's complete output; "
        "the result says whether role passwords are included. Fails when the globals file is "
        "missing or damaged: the backup could not be restored onto a new server with its roles.",
    )
    def globals_readable(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        artifact = _latest_artifact(context, key)
        if isinstance(artifact, dg.AssetCheckResult):
            return artifact
        return _result(artifact, check_globals(artifact), dg.AssetCheckSeverity.ERROR)

    @dg.asset_check(
        asset=key,
        name="size_not_anomalous",
        description=f"Warns when a backup is more than {settings.size_drop_warn_ratio:.0%} smaller than "
        "the previous one: often a sign of lost data or a dump of the wrong database.",
    )
    def size_not_anomalous(
        context: dg.AssetCheckExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.AssetCheckResult:
        artifact = _latest_artifact(context, key)
        if isinstance(artifact, dg.AssetCheckResult):
            return artifact
        # The backup's own folder: for a server target, that of its database.
        target = backup_engine.target(name)
        older = [
            a
            for a in list_artifacts(artifact.path.parent)
            if a.meta.started_at < artifact.meta.started_at
        ]
        if not older:
            return dg.AssetCheckResult(
                passed=True, metadata={"result": "first backup: nothing to compare with"}
            )
        previous = older[0]
        current_size, previous_size = artifact.meta.size_bytes, previous.meta.size_bytes
        change = (current_size - previous_size) / previous_size if previous_size else 0.0
        passed = change >= -target.settings.size_drop_warn_ratio
        message = (
            f"{human_size(current_size)} vs {human_size(previous_size)} for {previous.path.name} "
            f"({change:+.1%}; warning below -{target.settings.size_drop_warn_ratio:.0%})"
        )
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "result": message,
                "size_bytes": current_size,
                "previous_size_bytes": previous_size,
                "size_change_pct": round(change * 100, 2),
                "previous_backup": previous.path.name,
            },
        )

    return [checksum_matches, archive_readable, globals_readable, size_not_anomalous]


@dg.definitions
def backup_checks() -> dg.Definitions:
    return dg.Definitions(
        asset_checks=[
            c for name, s in project_config().targets.items() for c in build_backup_checks(name, s)
        ]
    )
