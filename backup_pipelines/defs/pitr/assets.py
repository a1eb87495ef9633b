"""PITR assets per PITR-enabled target: ``base_backup``, ``base_backup_offsite``,
``wal_archive`` (observed by ``wal_archive_sensor``) and ``pitr_drill``."""

from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.backup.base import load_base_backup, run_base_backup
from backup_pipelines.engine.config import ProjectConfig, TargetSettings
from backup_pipelines.engine.drills.pitr import pitr_drill
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.notify import Alert, send_alert
from backup_pipelines.engine.offsite import base_backup_offsite_storage
from backup_pipelines.engine.pitr.retention import PitrRetentionReport, apply_pitr_retention
from backup_pipelines.lib.names import (
    BASE_BACKUP,
    BASE_BACKUP_OFFSITE,
    PITR_DRILL,
    WAL_ARCHIVE,
    target_key,
)
from backup_pipelines.lib.project import pitr_targets
from backup_pipelines.lib.results import latest_materialized_path, user_error
from backup_pipelines.lib.tags import asset_attributes


def _alert_if_refused(
    context: dg.AssetExecutionContext,
    project: ProjectConfig,
    name: str,
    report: PitrRetentionReport,
) -> None:
    """Retention of base backups and WAL refused (clock implausible): tell people, once per run."""
    if report.clock_problem is None:
        return
    context.log.error(f"Base backup retention refused, nothing was pruned: {report.clock_problem}")
    send_alert(
        project,
        Alert(
            title="retention refused: the clock cannot be trusted",
            message=f"Retention of {name}'s base backups and WAL deleted nothing: "
            f"{report.clock_problem}. Check the host's clock (NTP).",
            target=name,
            what=BASE_BACKUP,
            reason=report.clock_problem,
            incident=f"clock:{name}:{BASE_BACKUP}",
        ),
        log=context.log,
    )


def _base_backup_asset(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    @dg.asset(
        key=target_key(name, BASE_BACKUP),
        **asset_attributes(name, "postgres"),
        description=(
            f"Physical base backup of the **{name}** cluster for point-in-time recovery.\n\n"
            "`pg_basebackup -Ft -X fetch` streams one tar (with its `backup_manifest`) through "
            f"{settings.pitr.base_backup_compression if settings.pitr else 'zstd'} compression and "
            f"SHA-256 hashing into `<backup_root>/{name}/base/base_<YYYYmmdd_HHMMSS>.tar.*`, with a "
            "`.sha256` and a `.meta` (start/end LSN and time, timeline, first WAL segment needed, "
            "server version).\n\n"
            "The server's configuration files kept outside its data directory (Debian/Ubuntu: "
            "`postgresql.conf`, `pg_hba.conf`, `pg_ident.conf` and `conf.d/` in "
            "`/etc/postgresql/<ver>/<cluster>/`) are stored in the same tar and listed in "
            "`.meta` (`server_config`), so a PITR restore of it starts; files it could not read "
            "are listed in `server_config_missing`.\n\n"
            "Afterwards the target's calendar retention prunes old base backups, and WAL older "
            "than the oldest kept base backup is pruned from the archive (never newer).\n\n"
            "Check: `base_backup_verified` (blocking) runs `pg_verifybackup` against the manifest."
        ),
    )
    def base_backup(
        context: dg.AssetExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.MaterializeResult:
        try:
            target = backup_engine.target(name)
            artifact = run_base_backup(target, log=context.log)
        except BackupPipelinesError as exc:
            raise user_error(exc) from None
        meta = artifact.meta
        try:
            retention = apply_pitr_retention(backup_engine.project(), target, log=context.log)
            _alert_if_refused(context, backup_engine.project(), name, retention)
        except (BackupPipelinesError, OSError) as exc:
            # The new backup is complete and stays; pruning is retried by the next run.
            context.log.warning(f"retention did not run: {exc}")
            retention = PitrRetentionReport([], [], [], None, errors=[str(exc)])
        if retention.pruned or retention.wal_removed:
            context.log.info(
                f"Retention pruned base backups {retention.pruned} and {len(retention.wal_removed)} "
                f"WAL file(s) older than {retention.keep_wal_from}"
            )
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(artifact.path)),
                "size_bytes": dg.MetadataValue.int(meta.size_bytes),
                "tar_bytes": dg.MetadataValue.int(meta.dump_bytes),
                "sha256": dg.MetadataValue.text(meta.sha256),
                "start_lsn": dg.MetadataValue.text(meta.start_lsn),  # type: ignore[attr-defined]
                "end_lsn": dg.MetadataValue.text(meta.end_lsn),  # type: ignore[attr-defined]
                "timeline": dg.MetadataValue.int(meta.timeline),  # type: ignore[attr-defined]
                "first_wal_segment": dg.MetadataValue.text(meta.first_wal_segment),  # type: ignore[attr-defined]
                "server_version": dg.MetadataValue.text(meta.server_version),
                "server_config_files": dg.MetadataValue.json(
                    [f.path for f in getattr(meta, "server_config", [])]
                ),
                "server_config_missing": dg.MetadataValue.json(
                    list(getattr(meta, "server_config_missing", []))
                ),
                "consistent_at": dg.MetadataValue.text(meta.finished_at.isoformat()),
                "duration_seconds": dg.MetadataValue.float(meta.duration_seconds),
                "base_backups_kept": dg.MetadataValue.json(retention.kept),
                "base_backups_pruned": dg.MetadataValue.json(retention.pruned),
                "wal_files_pruned": dg.MetadataValue.int(len(retention.wal_removed)),
                "wal_kept_from": dg.MetadataValue.text(retention.keep_wal_from or ""),
                "retention_errors": dg.MetadataValue.json(retention.errors),
                "retention_clock_problem": dg.MetadataValue.text(retention.clock_problem or ""),
            }
        )

    return base_backup


def _offsite_asset(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    @dg.asset(
        key=target_key(name, BASE_BACKUP_OFFSITE),
        deps=[target_key(name, BASE_BACKUP)],
        **asset_attributes(name, "s3"),
        description=(
            f"Offsite copy of the newest verified **{name}** base backup, like logical backups' "
            f"`offsite_copy`, in `s3://<offsite bucket>/<prefix>/{name}-pitr/base/` (a sibling of "
            "the logical backups' folder, so logical retention and restores never see it). Runs "
            "only after `base_backup_verified` passed. Without an offsite bucket for the target "
            "this step records that nothing was uploaded."
        ),
    )
    def base_backup_offsite(
        context: dg.AssetExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> dg.MaterializeResult:
        from backup_pipelines.engine.offsite import upload_backup

        target = backup_engine.target(name)
        if not target.settings.offsite.is_enabled:
            return dg.MaterializeResult(
                metadata={"uploaded": False, "reason": "offsite copies are not configured"}
            )
        path = latest_materialized_path(context, target_key(name, BASE_BACKUP))
        if path is None:
            raise dg.Failure(description="no base backup materialized yet", allow_retries=False)
        try:
            artifact, _ = load_base_backup(path)
            storage = base_backup_offsite_storage(target, client=offsite_s3.get_client())
            outcome = upload_backup(artifact, storage, log=context.log)
            retention = apply_pitr_retention(
                backup_engine.project(), target, remote_storage=storage, log=context.log
            )
            _alert_if_refused(context, backup_engine.project(), name, retention)
        except BackupPipelinesError as exc:
            raise user_error(exc) from None
        return dg.MaterializeResult(
            metadata={
                "uploaded": outcome.uploaded,
                "url": dg.MetadataValue.url(outcome.url),
                "size_bytes": outcome.info.size,
                "s3_checksum_sha256": outcome.info.checksum_sha256 or "",
            }
        )

    return base_backup_offsite


def _wal_archive_spec(name: str, settings: TargetSettings) -> dg.AssetSpec:
    pitr = settings.pitr
    assert pitr is not None
    where = " and ".join(str(p) for p in (pitr.archive_dir, pitr.archive_s3) if p is not None)
    return dg.AssetSpec(
        key=target_key(name, WAL_ARCHIVE),
        **asset_attributes(name, "postgres"),
        description=(
            f"The WAL archive of **{name}** ({where}), filled by PostgreSQL's `archive_command` "
            "(`backup-pipelines wal-push`). Observed every "
            f"{pitr.archive_check_interval_seconds}s by `wal_archive_sensor`: newest archived "
            "segment and its age, `pg_stat_archiver` failures, gaps since the oldest kept base "
            f"backup. A gap, failing archiving or a lag above {pitr.archive_lag_limit_minutes:g} "
            "min fails `wal_archive_healthy` and alerts the notifiers."
        ),
    )


def _drill_asset(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    @dg.asset(
        key=target_key(name, PITR_DRILL),
        deps=[target_key(name, BASE_BACKUP), target_key(name, WAL_ARCHIVE)],
        **asset_attributes(name, "postgres"),
        description=(
            f"Automated point-in-time recovery drill for **{name}**: marks a moment on the live "
            "server with two empty transactions (one before, one after), archives the WAL, "
            "restores the newest base backup to that moment on a scratch port and folder, and "
            "checks the copy stopped exactly there (first committed, second not), was promoted, "
            "is writable and every database opens. Records RTO (restore time) and RPO (distance "
            "between the target and the last replayed transaction), then removes the copy.\n\n"
            "Check: `pitr_drill_passed` (blocking)."
        ),
    )
    def pitr_drill_asset(
        context: dg.AssetExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.MaterializeResult:
        try:
            result = pitr_drill(
                backup_engine.project(), backup_engine.target(name), log=context.log
            )
        except BackupPipelinesError as exc:
            raise user_error(exc) from None
        metadata: dict[str, Any] = {
            "passed": result.passed,
            "result": result.message,
            "base_backup": result.base_backup or "",
            "target_time": result.target_time.isoformat() if result.target_time else "",
            "reached": result.reached.isoformat() if result.reached else "",
            "databases_checked": result.databases_checked,
        }
        if result.rto_seconds is not None:
            metadata["rto_seconds"] = dg.MetadataValue.float(result.rto_seconds)
        if result.rpo_seconds is not None:
            metadata["rpo_seconds"] = dg.MetadataValue.float(result.rpo_seconds)
        if result.timeline is not None:
            metadata["timeline"] = result.timeline
        metadata.update({k: str(v) for k, v in result.details.items()})
        return dg.MaterializeResult(metadata=metadata)

    return pitr_drill_asset


@dg.definitions
def pitr_assets() -> dg.Definitions:
    targets = pitr_targets()
    assets: list[dg.AssetsDefinition | dg.AssetSpec] = []
    for name, settings in targets.items():
        assets += [
            _base_backup_asset(name, settings),
            _offsite_asset(name, settings),
            _wal_archive_spec(name, settings),
            _drill_asset(name, settings),
        ]
    return dg.Definitions(assets=assets)
