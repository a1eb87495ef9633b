"""``<target>/restore_drill``: only a restore proves a backup, so restore one every week.

Each materialization restores the target's newest backup into a scratch database (on the drill
server when ``scratch_dsn_env`` is set), checks row counts and btree indexes, records the
measured RTO and the backup's age (RPO), and drops the scratch database. Its two checks are
evaluated by the same step, from the same drill.
"""

from collections.abc import Iterator

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.config import TargetSettings
from backup_pipelines.engine.drills.logical import DrillResult, run_drill
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.lib.names import (
    DRILL_PASSED_CHECK,
    LOGICAL_BACKUP,
    RESTORE_DRILL,
    RTO_CHECK,
    target_key,
)
from backup_pipelines.lib.partitions import database_partitions, partition_database
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.results import each_selected_target, user_error
from backup_pipelines.lib.tags import asset_attributes, host_pool, unique_op_names


def drill_metadata(result: DrillResult, rto_target_seconds: float) -> dict[str, dg.MetadataValue]:
    """Numeric values stay numeric so the UI plots drill history.

    A value the drill did not measure (the RTO of a failed restore) is left out rather than
    recorded as 0, so the plot shows a gap instead of a fake fast restore.
    """
    measured = {
        "rto_seconds": result.rto_seconds,
        "rpo_seconds": result.backup_age_seconds,
        "backup_age_hours": (
            round(result.backup_age_seconds / 3600, 3)
            if result.backup_age_seconds is not None
            else None
        ),
        "verify_seconds": result.verify_seconds,
        "restore_seconds": result.restore_seconds,
    }
    metadata: dict[str, dg.MetadataValue] = {
        "passed": dg.MetadataValue.bool(result.passed),
        "rto_target_seconds": dg.MetadataValue.float(rto_target_seconds),
        **{
            key: dg.MetadataValue.float(value)
            for key, value in measured.items()
            if value is not None
        },
        "tables": dg.MetadataValue.int(result.tables),
        "rows": dg.MetadataValue.int(result.rows),
        "dagster/row_count": dg.MetadataValue.int(result.rows),
        "indexes_checked": dg.MetadataValue.int(
            result.amcheck.indexes_checked if result.amcheck else 0
        ),
        "amcheck": dg.MetadataValue.text(result.amcheck.detail if result.amcheck else "not run"),
        "source": dg.MetadataValue.text(result.source),
        "backup": dg.MetadataValue.text(result.backup or "(none)"),
        "backup_taken_at": dg.MetadataValue.text(
            result.backup_taken_at.isoformat() if result.backup_taken_at else "(none)"
        ),
        "drill_server": dg.MetadataValue.text(result.scratch_server or "(none)"),
        "drill_mode": dg.MetadataValue.text(result.mode),
        "roles_created": dg.MetadataValue.int(result.roles_created),
        "scratch_database_dropped": dg.MetadataValue.bool(result.scratch_dropped),
        "result": dg.MetadataValue.text(result.summary()),
    }
    if result.failed_step:
        metadata["failed_step"] = dg.MetadataValue.text(result.failed_step)
    if result.mismatches:
        metadata["row_count_mismatches"] = dg.MetadataValue.table(
            [
                dg.TableRecord(
                    {"table": table, "expected": m["expected"] or 0, "restored": m["restored"] or 0}
                )
                for table, m in sorted(result.mismatches.items())
            ],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("table", "string"),
                    dg.TableColumn("expected", "int"),
                    dg.TableColumn("restored", "int"),
                ]
            ),
        )
    return metadata


def drill_check_results(
    result: DrillResult, rto_target_seconds: float
) -> list[dg.AssetCheckResult]:
    passed = dg.AssetCheckResult(
        check_name=DRILL_PASSED_CHECK,
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "result": dg.MetadataValue.text(result.summary()),
            "failed_step": dg.MetadataValue.text(result.failed_step or "(none)"),
            "reason": dg.MetadataValue.text(result.reason or "(none)"),
            "backup": dg.MetadataValue.text(result.backup or "(none)"),
            "tables": dg.MetadataValue.int(result.tables),
            "rows": dg.MetadataValue.int(result.rows),
        },
    )
    if result.rto_seconds is None:
        rto = dg.AssetCheckResult(
            check_name=RTO_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "reason": dg.MetadataValue.text(
                    f"no RTO measured: the drill failed at step '{result.failed_step}'"
                ),
                "rto_target_seconds": dg.MetadataValue.float(rto_target_seconds),
            },
        )
    else:
        within = result.rto_seconds <= rto_target_seconds
        rto = dg.AssetCheckResult(
            check_name=RTO_CHECK,
            passed=within,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "rto_seconds": dg.MetadataValue.float(result.rto_seconds),
                "rto_target_seconds": dg.MetadataValue.float(rto_target_seconds),
                "result": dg.MetadataValue.text(
                    f"restore took {result.rto_seconds:.1f}s, "
                    f"{'within' if within else 'OVER'} the target of {rto_target_seconds:g}s"
                ),
            },
        )
    return [passed, rto]


def _description(name: str, settings: TargetSettings) -> str:
    same = (
        f"the drill server in `${settings.scratch_dsn_env}`"
        if settings.scratch_dsn_env
        else "the target's own server, under a throwaway name"
    )
    fresh = (
        "a throwaway cluster initialised for the drill (initdb with the binaries of the "
        "backup's server version; the roles come from the backup's globals file, so the drill "
        "proves the backup set alone restores the database)"
    )
    mode = settings.restore.drill.fresh_server
    if mode is True:
        server = fresh
    elif mode is False:
        server = same
    else:
        server = f"{fresh} when those binaries are installed on this host, else on {same}"
    return (
        f"Restore drill of **{name}**"
        + (" (one partition per database of the server)" if settings.is_server else "")
        + ": restores the newest backup (the offsite copy on S3 when "
        f"there is one, else the local file) into a scratch database on {server}, compares every "
        "table's row count with the backup's `.meta`, runs amcheck's `bt_index_check` on every "
        "restored btree index, then drops the scratch database. The target's database is never "
        "touched.\n\n"
        "`drill_mode` says which ran: `fresh_server` or `same_server` "
        "(`restore.drill.fresh_server`).\n\n"
        "Metadata to plot: `rto_seconds` (measured time to a verified restore), `rpo_seconds` "
        "(age of the backup drilled), `tables`, `rows`, `indexes_checked`.\n\n"
        f"Checks: `{DRILL_PASSED_CHECK}` (ERROR; fails the run and says which step failed and "
        f"why) and `{RTO_CHECK}` (WARN when slower than restore.rto_target_seconds = "
        f"{settings.restore.rto_target_seconds:g}s)."
    )


def _drill_specs(
    name: str, settings: TargetSettings
) -> tuple[dg.AssetSpec, list[dg.AssetCheckSpec]]:
    key = target_key(name, RESTORE_DRILL)
    spec = dg.AssetSpec(
        key,
        deps=[target_key(name, LOGICAL_BACKUP)],
        partitions_def=database_partitions(name),
        description=_description(name, settings),
        **asset_attributes(name, "postgres"),
    )
    checks = [
        dg.AssetCheckSpec(
            DRILL_PASSED_CHECK,
            asset=key,
            blocking=True,
            description="The newest backup restored, every table's row count matches its "
            ".meta and amcheck found no broken btree index. On failure: the step and the reason.",
        ),
        dg.AssetCheckSpec(
            RTO_CHECK,
            asset=key,
            description="The measured restore time is within restore.rto_target_seconds "
            "for this target (warning only).",
        ),
    ]
    return spec, checks


def drill_one(
    context: dg.AssetExecutionContext,
    name: str,
    database: str | None,
    backup_engine: BackupEngineResource,
) -> dg.MaterializeResult:
    """Drill one target (in a partition run: one database of a server target)."""
    key = target_key(name, RESTORE_DRILL)
    try:
        project = backup_engine.project()
        rto_target = project.target(name).settings.restore.rto_target_seconds
        result = run_drill(project, name, log=context.log, database=database)
    except BackupPipelinesError as exc:  # the targets file itself is broken
        raise user_error(exc) from None
    return dg.MaterializeResult(
        asset_key=key,
        metadata=drill_metadata(result, rto_target),
        check_results=[
            check._replace(asset_key=key) for check in drill_check_results(result, rto_target)
        ],
    )


def build_restore_drill(name: str, settings: TargetSettings) -> dg.AssetsDefinition:
    """The drill of a server target (``databases: all``): partitioned by database."""
    spec, checks = _drill_specs(name, settings)

    @dg.multi_asset(
        name=f"{name}__restore_drill", specs=[spec], check_specs=checks, pool=host_pool(name)
    )
    def restore_drill(
        context: dg.AssetExecutionContext, backup_engine: BackupEngineResource
    ) -> dg.MaterializeResult:
        return drill_one(context, name, partition_database(context), backup_engine)

    return restore_drill


def build_restore_drills(
    op_name: str, pool: str, targets: dict[str, TargetSettings]
) -> dg.AssetsDefinition:
    """The drills of the single-database targets on one database server, as one op in that
    server's pool (the same limit as one op per target, one definition to load instead of
    one per target). A run drills whichever of them it selects, one after the other; a failed
    drill is its own target's red check, and the step fails at the end."""
    specs = [_drill_specs(name, settings) for name, settings in targets.items()]

    @dg.multi_asset(
        name=op_name,
        specs=[spec for spec, _ in specs],
        check_specs=[check for _, checks in specs for check in checks],
        can_subset=True,
        pool=pool,
    )
    def restore_drills(
        context: dg.AssetExecutionContext, backup_engine: BackupEngineResource
    ) -> Iterator[dg.MaterializeResult]:
        yield from each_selected_target(
            context, lambda name: drill_one(context, name, None, backup_engine), "restore drill"
        )

    return restore_drills


def restore_drill_assets() -> list[dg.AssetsDefinition]:
    targets = project_config().targets
    by_pool: dict[str, dict[str, TargetSettings]] = {}
    for name, settings in targets.items():
        if not settings.is_server:
            by_pool.setdefault(host_pool(name), {})[name] = settings
    op_names = unique_op_names("restore_drills", by_pool)
    return [
        *(build_restore_drill(n, s) for n, s in targets.items() if s.is_server),
        *(build_restore_drills(op_names[pool], pool, group) for pool, group in by_pool.items()),
    ]


@dg.definitions
def restore_drill_definitions() -> dg.Definitions:
    return dg.Definitions(assets=restore_drill_assets())
