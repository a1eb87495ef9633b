"""Integrity checks on each ``<target>/logical_backup``: they turn red in the UI when a backup
file is tampered with, truncated or suspiciously small."""

from collections.abc import Callable, Iterator
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


def _size_not_anomalous(artifact: BackupArtifact, drop_warn_ratio: float) -> dg.AssetCheckResult:
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
    passed = change >= -drop_warn_ratio
    message = (
        f"{human_size(current_size)} vs {human_size(previous_size)} for {previous.path.name} "
        f"({change:+.1%}; warning below -{drop_warn_ratio:.0%})"
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


# The file checks, in the order they run (the cheap checksum first).
_FILE_CHECKS: dict[str, Callable[[BackupArtifact], CheckOutcome]] = {
    "checksum_matches": check_checksum,
    "archive_readable": check_readable,
    "globals_readable": check_globals,
}
SIZE_CHECK = "size_not_anomalous"


def backup_check_specs(name: str, settings: TargetSettings) -> list[dg.AssetCheckSpec]:
    """The integrity checks of ``<name>/logical_backup``."""
    key = target_key(name, LOGICAL_BACKUP)
    return [
        dg.AssetCheckSpec(
            "checksum_matches",
            asset=key,
            blocking=True,
            description="Recomputes the backup file's SHA-256 and compares it with its `.sha256` "
            "and `.meta`. Fails (and stops downstream steps) when the file was modified, "
            "truncated or replaced.",
        ),
        dg.AssetCheckSpec(
            "archive_readable",
            asset=key,
            description="Decompresses (and decrypts) the whole backup: a plain dump must end with "
            "pg_dump's 'dump complete' trailer, a custom archive must list and decode every data "
            "block, a directory dump must hold every file its table of contents lists, each data "
            "file decoding in full to the row counts its .meta records.",
        ),
        dg.AssetCheckSpec(
            "globals_readable",
            asset=key,
            description="The server's globals stored with the backup (roles, memberships, role "
            "settings) are there, match their checksum and decode to pg_dumpall's complete "
            "output; the result says whether role passwords are included. Fails when the globals "
            "file is missing or damaged: the backup could not be restored onto a new server with "
            "its roles.",
        ),
        dg.AssetCheckSpec(
            SIZE_CHECK,
            asset=key,
            description=f"Warns when a backup is more than {settings.size_drop_warn_ratio:.0%} "
            "smaller than the previous one: often a sign of lost data or a dump of the wrong "
            "database.",
        ),
    ]


def _check_one_target(
    context: dg.AssetCheckExecutionContext,
    backup_engine: BackupEngineResource,
    key: dg.AssetKey,
    selected: set[str],
) -> Iterator[dg.AssetCheckResult]:
    name = key.path[0]
    artifact = _latest_artifact(context, key)
    for check_name in [*_FILE_CHECKS, SIZE_CHECK]:
        if check_name not in selected:
            continue
        if isinstance(artifact, dg.AssetCheckResult):
            result = artifact
        elif check_name == SIZE_CHECK:
            # The backup's own folder: for a server target, that of its database.
            ratio = backup_engine.target(name).settings.size_drop_warn_ratio
            result = _size_not_anomalous(artifact, ratio)
        else:
            outcome = _FILE_CHECKS[check_name](artifact)
            result = _result(artifact, outcome, dg.AssetCheckSeverity.ERROR)
        yield result._replace(asset_key=key, check_name=check_name)


def build_backup_checks(
    op_name: str, targets: dict[str, TargetSettings]
) -> dg.AssetChecksDefinition:
    """The integrity checks of the given targets' ``logical_backup`` as one op: one step per run
    whatever checks it takes, one definition to load (a thousand targets load in seconds), any
    subset runnable alone ("Execute checks" in the UI). Each check's verdict is its own; a
    check that cannot run (no backup yet, a file that cannot be opened) fails by itself."""
    specs = [
        spec for name, settings in targets.items() for spec in backup_check_specs(name, settings)
    ]

    @dg.multi_asset_check(
        name=op_name,
        specs=specs,
        can_subset=True,
        description="Integrity checks of the newest backup of "
        + (next(iter(targets)) if len(targets) == 1 else "each single-database target"),
    )
    def logical_backup_checks(
        context: dg.AssetCheckExecutionContext, backup_engine: BackupEngineResource
    ) -> Iterator[dg.AssetCheckResult]:
        selected: dict[dg.AssetKey, set[str]] = {}
        for check in context.selected_asset_check_keys:
            selected.setdefault(check.asset_key, set()).add(check.name)
        for key in sorted(selected, key=lambda k: k.to_user_string()):
            done: set[str] = set()
            try:
                for result in _check_one_target(context, backup_engine, key, selected[key]):
                    done.add(str(result.check_name))
                    yield result
            except Exception as exc:  # one target's broken check must not silence the others'
                context.log.exception(f"checking the backup of {key.path[0]} failed")
                for check_name in sorted(selected[key] - done):
                    yield failure(f"the check could not run: {type(exc).__name__}: {exc}")._replace(
                        asset_key=key, check_name=check_name
                    )

    return logical_backup_checks


@dg.definitions
def backup_checks() -> dg.Definitions:
    targets = project_config().targets
    single = {name: settings for name, settings in targets.items() if not settings.is_server}
    return dg.Definitions(
        asset_checks=[
            # Server targets' backups are partitioned by database: each keeps its own op.
            *(
                build_backup_checks(f"{name}__logical_backup_checks", {name: settings})
                for name, settings in targets.items()
                if settings.is_server
            ),
            *([build_backup_checks("logical_backup_checks", single)] if single else []),
        ]
    )
