"""``server_databases_sensor``: keeps the partitions of every server target (``databases: all``)
in step with the databases on its server.

Every few minutes it lists each server's databases (connectable, not templates, not excluded)
and:

- adds a partition for each new one, so the next scheduled run backs it up (no YAML edit, no
  code-location reload);
- removes the partition of a database that was dropped (or is now excluded), so the schedules
  stop asking for it. Its backups stay where they are, with their retention; it is announced
  ONCE through the notifiers (the sensor cursor remembers which databases were announced, and
  forgets one that comes back).

A server that cannot be reached changes nothing: its partitions stay as they were (never read
as "every database was dropped") and the tick says why.
"""

import json
from typing import Any

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.engine.databases import is_excluded, server_databases
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.notify import Alert, send_alert
from backup_pipelines.lib.partitions import database_partitions, server_targets

SENSOR_NAME = "server_databases_sensor"
INTERVAL_SECONDS = 300
# Dagster refuses partition keys holding these (a database name may).
_NOT_IN_PARTITION_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def _dropped_alert(config: ProjectConfig, target: str, database: str) -> Alert:
    settings = config.targets[target]
    why = (
        "now matches an exclude pattern"
        if is_excluded(database, settings.exclude)
        else "is no longer on the server"
    )
    folder = config.target(target, database).backup_dir
    return Alert(
        title=f"database {database} no longer backed up",
        message=(
            f"Database '{database}' of server target '{target}' {why}: it is no longer backed "
            f"up. Its backups are kept in {folder} (and offsite), with their retention; restore "
            f"one with `backup-pipelines restore latest {target} --database {database}`."
        ),
        severity="warning",
        target=target,
        what=f"database {database}",
        reason=why,
        incident=f"dropped:{target}:{database}",
    )


def sync_server(
    context: dg.SensorEvaluationContext,
    config: ProjectConfig,
    target: str,
    state: dict[str, Any],
) -> tuple[list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest], str]:
    """The partition changes for one server target, and a line for the tick's log."""
    partitions = database_partitions(target, config)
    assert partitions is not None and partitions.name is not None
    present = server_databases(config.target(target))
    unusable = [d for d in present if any(s in d for s in _NOT_IN_PARTITION_KEYS)]
    present = [d for d in present if d not in unusable]
    existing = set(context.instance.get_dynamic_partitions(partitions.name))
    new = [d for d in present if d not in existing]
    gone = sorted(existing - set(present))
    # A database that is back (re-created, or no longer excluded) is announced again next time.
    notified = set(state.get("notified", [])) - set(present)
    for database in gone:
        if database in notified:
            continue
        report = send_alert(config, _dropped_alert(config, target, database), log=context.log)
        if report.delivered or not report.failed:
            notified.add(database)
    state["notified"] = sorted(notified)
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    if new:
        requests.append(partitions.build_add_request(new))
    if gone:
        requests.append(partitions.build_delete_request(gone))
    line = f"{target}: {len(present)} database(s)"
    if new:
        line += f", added {', '.join(new)}"
    if gone:
        line += f", dropped {', '.join(gone)} (backups kept)"
    if unusable:
        line += f", cannot be partitions (names): {', '.join(map(repr, unusable))}"
    return requests, line


@dg.sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps one partition per database of every server target (databases: all): "
    "adds new databases (backed up by the next scheduled run), removes dropped ones (their "
    "backups are kept) and announces each dropped database once.",
)
def server_databases_sensor(
    context: dg.SensorEvaluationContext, backup_engine: BackupEngineResource
) -> dg.SensorResult:
    try:
        cursor = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        cursor = {}
    config = backup_engine.project()
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    lines = []
    state: dict[str, Any] = {}
    for target in server_targets():
        if target not in config.targets or not config.targets[target].is_server:
            continue  # changed since the definitions loaded: the next reload decides
        state[target] = dict(cursor.get(target) or {})
        try:
            changes, line = sync_server(context, config, target, state[target])
        except BackupPipelinesError as exc:
            lines.append(f"{target}: unchanged, the databases cannot be listed: {exc.one_line()}")
            continue
        requests += changes
        lines.append(line)
    for line in lines:
        context.log.info(line)
    return dg.SensorResult(
        dynamic_partitions_requests=requests,
        cursor=json.dumps(state, sort_keys=True),
        skip_reason=None if requests else "; ".join(lines) or "no server targets",
    )


@dg.definitions
def server_database_sensors() -> dg.Definitions:
    if not server_targets():
        return dg.Definitions()
    return dg.Definitions(sensors=[server_databases_sensor])
