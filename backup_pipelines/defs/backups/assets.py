"""``<target>/logical_backup``: one streamed, checksummed pg_dump per configured target."""

from datetime import timedelta

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.lib.names import LOGICAL_BACKUP, target_key
from backup_pipelines.lib.partitions import database_partitions, partition_database
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.results import user_error
from backup_pipelines.lib.tags import asset_attributes, host_pool

# Dagster's smallest freshness window (a shorter max_age still alerts through the sensor).
MIN_FRESHNESS_WINDOW = timedelta(minutes=1)


def artifact_metadata(artifact: BackupArtifact) -> dict[str, dg.MetadataValue | int | float | str]:
    meta = artifact.meta
    rows = [
        dg.TableRecord({"table": table, "rows": count})
        for table, count in sorted(meta.row_counts.items())
    ]
    return {
        "path": dg.MetadataValue.path(str(artifact.path)),
        "size_bytes": dg.MetadataValue.int(meta.size_bytes),
        "dump_bytes": dg.MetadataValue.int(meta.dump_bytes),
        "sha256": dg.MetadataValue.text(meta.sha256),
        "duration_seconds": dg.MetadataValue.float(meta.duration_seconds),
        "compression_ratio": dg.MetadataValue.float(round(meta.compression_ratio, 3)),
        "dagster/row_count": dg.MetadataValue.int(meta.total_rows),
        "table_count": dg.MetadataValue.int(len(meta.row_counts)),
        "row_counts": dg.MetadataValue.table(
            rows,
            schema=dg.TableSchema(
                columns=[dg.TableColumn("table", "string"), dg.TableColumn("rows", "int")]
            ),
        ),
        "server_version": dg.MetadataValue.text(meta.server_version),
        "database": dg.MetadataValue.text(meta.database),
        "format": dg.MetadataValue.text(f"{meta.format}/{meta.compression}"),
        "encryption": dg.MetadataValue.text(meta.encryption.get("mode", "none")),
        **_globals_metadata(artifact),
    }


def _globals_metadata(artifact: BackupArtifact) -> dict[str, dg.MetadataValue | int | float | str]:
    """What the backup set holds of the server's globals (names and counts, never a password)."""
    entry = artifact.meta.globals
    if entry is None:
        return {
            "globals": dg.MetadataValue.text("none (backup taken before globals were captured)")
        }
    metadata: dict[str, dg.MetadataValue | int | float | str] = {
        "globals": dg.MetadataValue.text(entry.file_name),
        "globals_roles": dg.MetadataValue.int(entry.roles),
        "globals_role_passwords": dg.MetadataValue.bool(entry.role_passwords),
    }
    if not entry.role_passwords:
        metadata["globals_role_passwords_missing"] = dg.MetadataValue.text(
            entry.role_passwords_reason or "pg_authid not readable by the backup role"
        )
    return metadata


def _dump_phrase(settings: TargetSettings) -> str:
    if settings.format == "directory":
        return (
            f"pg_dump -j {settings.dump_jobs} (directory format: tables dumped in parallel in one "
            "snapshot, the folder stored as one tar)"
        )
    return f"pg_dump ({settings.format} format)"


def _description(name: str, settings: TargetSettings) -> str:
    if settings.is_server:
        return _server_description(name, settings)
    return (
        f"Nightly logical backup of the **{name}** database (connection from "
        f"`${settings.dsn_env}`).\n\n"
        f"{_dump_phrase(settings)} streams through {settings.compression} compression and "
        "SHA-256 hashing into `<backup_root>/"
        f"{name}/<database>_<YYYYmmdd_HHMMSS>` with a `.sha256` and a `.meta` beside it. Row counts are "
        "taken in the dump's own snapshot, so a restore can be checked exactly.\n\n"
        "The server's globals (roles, memberships, role settings, tablespaces: `pg_dumpall "
        "--globals-only`) are stored with every backup (`<backup>.globals...`), so it can be "
        "restored onto a new server; `globals_role_passwords` is false when the backup role may "
        "not read the password hashes (not a superuser).\n\n"
        "Checks: `checksum_matches` (blocks downstream steps), `archive_readable`, "
        "`globals_readable`, `size_not_anomalous`.\n\n"
        "Manual restore of a plain backup: `gunzip -c FILE | psql -v ON_ERROR_STOP=1 --single-transaction DB`."
    )


def _server_description(name: str, settings: TargetSettings) -> str:
    excluded = ", ".join(f"`{p}`" for p in settings.exclude) or "none"
    return (
        f"Logical backups of **every database** of the **{name}** server (connection from "
        f"`${settings.dsn_env}`), one partition per database.\n\n"
        "Partitions follow the server: `server_databases_sensor` adds a partition for each new "
        "database (backed up by the next scheduled run) and removes the one of a dropped "
        "database, whose backups are kept (retention still applies) and which is announced once "
        f"through the notifiers. Templates are never backed up; excluded patterns: {excluded}.\n\n"
        f"Each database: {_dump_phrase(settings)} through {settings.compression} "
        f"compression and SHA-256 hashing into `<backup_root>/{name}/<database>/` with a "
        "`.sha256` and a `.meta` beside it. A database that fails (no CONNECT privilege, a "
        "lock) fails its own partition only.\n\n"
        "Checks (per partition run): `checksum_matches` (blocks downstream steps), "
        "`archive_readable`, `size_not_anomalous`."
    )


def build_logical_backup(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    @dg.asset(
        key=target_key(name, LOGICAL_BACKUP),
        **asset_attributes(name, "postgres"),
        description=_description(name, settings),
        # Backups per database server are capped by this pool's limit (dagster.yaml).
        pool=host_pool(name),
        partitions_def=database_partitions(name),
        # Shows the asset as stale in the UI once the newest backup is older than max_age.
        freshness_policy=dg.FreshnessPolicy.time_window(
            fail_window=max(settings.max_age, MIN_FRESHNESS_WINDOW)
        )
        if settings.max_age
        else None,
    )
    def logical_backup(
        context: dg.AssetExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.MaterializeResult:
        try:
            target = backup_engine.project().target(name, partition_database(context))
            artifact = run_backup(target, log=context.log)
        except BackupPipelinesError as exc:
            raise user_error(exc) from None
        return dg.MaterializeResult(metadata=artifact_metadata(artifact))

    return logical_backup


def logical_backup_assets() -> list[dg.AssetsDefinition]:
    return [
        build_logical_backup(name, settings) for name, settings in project_config().targets.items()
    ]


@dg.definitions
def backup_assets() -> dg.Definitions:
    return dg.Definitions(assets=logical_backup_assets())
