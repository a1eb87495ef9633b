"""``<target>/backup_inventory``: every backup on disk and in S3, with calendar retention applied."""

from collections.abc import Iterator

import dagster as dg
from dagster_aws.s3 import S3Resource

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.listing import human_size
from backup_pipelines.engine.offsite import offsite_storage
from backup_pipelines.engine.retention import RetentionReport, prune_target
from backup_pipelines.lib.names import BACKUP_INVENTORY, LOGICAL_BACKUP, OFFSITE_COPY, target_key
from backup_pipelines.lib.partitions import database_partitions, partition_database
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.results import each_selected_target, user_error
from backup_pipelines.lib.tags import asset_attributes

INVENTORY_COLUMNS = [
    dg.TableColumn("backup", "string"),
    dg.TableColumn("taken_at", "string", description="Start time recorded in .meta (UTC)"),
    dg.TableColumn("purpose", "string"),
    dg.TableColumn("status", "string", description="verified / unverified / failed"),
    dg.TableColumn("where", "string", description="local, s3 or local+s3"),
    dg.TableColumn("size", "string"),
    dg.TableColumn("retention_class", "string", description="daily / weekly / monthly / ..."),
    dg.TableColumn("action", "string", description="kept or pruned"),
    dg.TableColumn("reason", "string"),
]


CLOCK_CHECK = "clock_plausible"


def inventory_table(report: RetentionReport) -> dg.TableMetadataValue:
    rows = []
    for item in report.unreadable:
        rows.append(
            dg.TableRecord(
                {
                    "backup": item.path.name,
                    "taken_at": "?",
                    "purpose": "?",
                    "status": "damaged",
                    "where": "local",
                    "size": "?",
                    "retention_class": "unreadable",
                    "action": "left alone",
                    "reason": f"{item.reason}: not trusted, never deleted by retention",
                }
            )
        )
    for entry in report.entries:
        decision = entry.decision
        assert decision is not None
        where = entry.locations
        if decision.keep:
            action = "kept"
        elif report.dry_run:
            action = "would prune"
        else:
            action = (
                "pruned from " + "+".join(entry.deleted_from)
                if entry.deleted_from
                else "prune failed"
            )
        rows.append(
            dg.TableRecord(
                {
                    "backup": entry.name,
                    "taken_at": entry.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "purpose": entry.purpose,
                    "status": entry.status,
                    "where": where,
                    "size": human_size(entry.size_bytes),
                    "retention_class": decision.retention_class,
                    "action": action,
                    "reason": "; ".join(decision.reasons) or "outside every retention window",
                }
            )
        )
    return dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=INVENTORY_COLUMNS))


def _description(name: str, settings: TargetSettings) -> str:
    r = settings.retention
    return (
        f"Every **{name}** backup on local disk and in S3, with calendar retention applied: keep "
        f"the newest backup of each of the last {r.daily} days, {r.weekly} ISO weeks and "
        f"{r.monthly} months that have a backup (timezone of the targets file), decided from the "
        f"times recorded in `.meta`. The newest {r.daily} verified backups are always kept, "
        "however old. When the newest backup failed verification or is damaged nothing is "
        "deleted; when the clock cannot be trusted (check `clock_plausible`) nothing is deleted "
        f"either. Safety backups (pre-restore, pre-rollback) are kept for {r.daily} days. Each "
        "pruned backup goes with its `.sha256` and `.meta`, locally and in S3. Backups whose "
        f"`.meta` is missing or unreadable are listed and never deleted. `.partial` leftovers "
        f"older than {r.partial_max_age_hours:g} h are removed.\n\n"
        f"Same from the shell: `backup-pipelines prune {name} --dry-run`."
    )


def clock_check_result(report: RetentionReport) -> dg.AssetCheckResult:
    """``clock_plausible``: red (ERROR, so failed_check_alert_sensor alerts) when retention
    refused to run because "now" is implausible against the backups."""
    future = [r.key for r in report.plan.future_dated]
    problem = report.plan.clock_problem
    metadata: dict[str, dg.RawMetadataValue] = {"future_dated": dg.MetadataValue.json(future)}
    if problem is None:
        metadata["result"] = "the clock agrees with the backups' recorded times"
    else:
        metadata["reason"] = f"retention refused, nothing was deleted: {problem}"
    return dg.AssetCheckResult(
        check_name=CLOCK_CHECK,
        passed=problem is None,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
    )


def _clock_check_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        CLOCK_CHECK,
        asset=key,
        description="Fails when this host's clock cannot be trusted against the "
        "backups' recorded times: a backup dated in the future (the clock went back, or "
        "the backup was taken while it was fast; it is never used as the newest backup) "
        "or a newest backup older than 3x max_age (the clock jumped forward, or backups "
        "stopped). Retention then deletes nothing until the times agree again.",
    )


def _inventory_spec(name: str, settings: TargetSettings) -> dg.AssetSpec:
    upstream = OFFSITE_COPY if settings.offsite.is_enabled else LOGICAL_BACKUP
    return dg.AssetSpec(
        target_key(name, BACKUP_INVENTORY),
        deps=[target_key(name, upstream)],
        partitions_def=database_partitions(name),
        description=_description(name, settings),
        **asset_attributes(name, "python"),
    )


def take_inventory(
    context: dg.AssetExecutionContext,
    name: str,
    database: str | None,
    backup_engine: BackupEngineResource,
    offsite_s3: S3Resource,
) -> dg.MaterializeResult:
    """Apply retention to one target (one database of a server target) and describe what is
    kept: the materialization of ``<name>/backup_inventory`` with its ``clock_plausible``."""
    key = target_key(name, BACKUP_INVENTORY)
    try:
        project = backup_engine.project()
        target = project.target(name, database)
        storage = None
        if target.settings.offsite.is_enabled:
            storage = offsite_storage(target, client=offsite_s3.get_client())
        report = prune_target(target, timezone=project.timezone, storage=storage, log=context.log)
    except BackupPipelinesError as exc:
        raise user_error(exc) from None
    for error in report.errors:
        context.log.warning(f"{name}: {error}")
    if report.plan.held:
        context.log.warning(f"{name}: retention on hold: {report.plan.hold_reason}")
    for item in report.unreadable:
        context.log.warning(f"{name}: left alone (not trusted): {item.path.name}: {item.reason}")
    pruned = report.pruned
    for entry in pruned:
        context.log.info(
            f"{name}: pruned {entry.name} ({'+'.join(entry.deleted_from) or 'nothing'})"
        )
    return dg.MaterializeResult(
        asset_key=key,
        metadata={
            "backups": inventory_table(report),
            "backup_count": dg.MetadataValue.int(
                sum(1 for e in report.entries if e.decision and e.decision.keep)
            ),
            "local_count": dg.MetadataValue.int(
                sum(1 for e in report.entries if e.local and e.decision and e.decision.keep)
            ),
            "s3_count": dg.MetadataValue.int(
                sum(1 for e in report.entries if e.remote and e.decision and e.decision.keep)
            ),
            "pruned": dg.MetadataValue.json([e.name for e in pruned]),
            "pruned_count": dg.MetadataValue.int(len(pruned)),
            "retention_held": dg.MetadataValue.bool(report.plan.held),
            "hold_reason": dg.MetadataValue.text(report.plan.hold_reason or ""),
            "clock_problem": dg.MetadataValue.text(report.plan.clock_problem or ""),
            "unreadable": dg.MetadataValue.json(
                {item.path.name: item.reason for item in report.unreadable}
            ),
            "leftovers_removed": dg.MetadataValue.json(report.leftovers_removed),
            "errors": dg.MetadataValue.json(report.errors),
            "policy": dg.MetadataValue.text(
                f"daily {target.settings.retention.daily}, weekly "
                f"{target.settings.retention.weekly}, monthly "
                f"{target.settings.retention.monthly} ({project.timezone})"
            ),
        },
        check_results=[clock_check_result(report)._replace(asset_key=key)],
    )


def build_backup_inventory(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    """The inventory of a server target (``databases: all``): partitioned by database."""
    spec = _inventory_spec(name, settings)

    @dg.multi_asset(
        name=f"{name}__backup_inventory",
        specs=[spec],
        check_specs=[_clock_check_spec(spec.key)],
    )
    def backup_inventory(
        context: dg.AssetExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> dg.MaterializeResult:
        return take_inventory(context, name, partition_database(context), backup_engine, offsite_s3)

    return backup_inventory


def build_backup_inventories(targets: dict[str, TargetSettings]) -> dg.AssetsDefinition:
    """The inventories of every single-database target, as one op that materializes whichever
    of them a run selects (loading a thousand targets costs one definition, not a thousand).
    A target whose retention fails does not stop the others; the step fails at the end."""
    specs = [_inventory_spec(name, settings) for name, settings in targets.items()]

    @dg.multi_asset(
        name=BACKUP_INVENTORY,
        specs=specs,
        check_specs=[_clock_check_spec(spec.key) for spec in specs],
        can_subset=True,
    )
    def backup_inventory(
        context: dg.AssetExecutionContext,
        backup_engine: BackupEngineResource,
        offsite_s3: S3Resource,
    ) -> Iterator[dg.MaterializeResult]:
        yield from each_selected_target(
            context,
            lambda name: take_inventory(context, name, None, backup_engine, offsite_s3),
            "retention",
        )

    return backup_inventory


@dg.definitions
def inventory_assets() -> dg.Definitions:
    targets = project_config().targets
    single = {name: settings for name, settings in targets.items() if not settings.is_server}
    return dg.Definitions(
        # The offsite_s3 resource comes from defs/offsite/assets.py.
        assets=[
            *([build_backup_inventories(single)] if single else []),
            *(build_backup_inventory(n, s) for n, s in targets.items() if s.is_server),
        ],
    )
