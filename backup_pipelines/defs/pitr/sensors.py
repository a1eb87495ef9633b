"""``wal_archive_sensor``: looks at every PITR target's WAL archive, records an observation on
``<target>/wal_archive`` and a ``wal_archive_healthy`` evaluation, and alerts the notifiers when
an archive becomes unhealthy (and, if configured, when it recovers)."""

import json

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.notify import Alert, send_alert
from backup_pipelines.engine.pitr.health import ArchiveHealth, archive_health
from backup_pipelines.lib.names import WAL_ARCHIVE, target_key
from backup_pipelines.lib.pitr import health_check_evaluation, health_metadata
from backup_pipelines.lib.project import pitr_targets


def _interval() -> int:
    intervals = [s.pitr.archive_check_interval_seconds for s in pitr_targets().values() if s.pitr]
    return min(intervals, default=120)


def _alert(target: str, health: ArchiveHealth, link: str) -> Alert:
    if health.healthy:
        return Alert(
            title="WAL archive healthy again",
            message=health.summary(),
            severity="resolved",
            target=target,
            what="wal_archive",
            link=link,
            incident=f"wal_archive:{target}",
        )
    return Alert(
        title="WAL archive unhealthy: point-in-time recovery at risk",
        message=health.summary(),
        severity="critical",
        target=target,
        what="wal_archive",
        reason="; ".join(health.problems),
        link=link,
        incident=f"wal_archive:{target}",
        details={"Archive": health.archive, "Newest segment": health.newest_segment or "(none)"},
    )


@dg.sensor(
    name="wal_archive_sensor",
    minimum_interval_seconds=_interval(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every few minutes: newest archived WAL segment and its age, pg_stat_archiver "
    "failures and gaps since the oldest kept base backup, per PITR target. Records a "
    "wal_archive observation and the wal_archive_healthy check, and alerts the notifiers when "
    "an archive turns unhealthy (once, until it recovers).",
)
def wal_archive_sensor(
    context: dg.SensorEvaluationContext, backup_engine: BackupEngineResource
) -> dg.SensorResult:
    previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    try:
        config: ProjectConfig = backup_engine.project()
    except BackupPipelinesError as exc:
        context.log.error(f"cannot read the targets file: {exc}")
        return dg.SensorResult(skip_reason="the targets file cannot be read (see the tick log)")
    events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
    states: dict[str, str] = {}
    for name in pitr_targets():
        try:
            health = archive_health(config.target(name))
        except BackupPipelinesError as exc:
            health = ArchiveHealth(name, [exc.message], "(unavailable)")
        except Exception as exc:  # an archive we cannot look at is a problem to report, not a crash
            health = ArchiveHealth(
                name, [f"the WAL archive could not be checked: {type(exc).__name__}: {exc}"], "?"
            )
        events.append(
            dg.AssetObservation(
                asset_key=target_key(name, WAL_ARCHIVE), metadata=health_metadata(health)
            )
        )
        events.append(health_check_evaluation(name, health))
        state = "healthy" if health.healthy else "unhealthy"
        states[name] = state
        was = previous.get(name, "healthy")
        if state != was and (state == "unhealthy" or config.alerts.send_resolved):
            link = f"{config.alerts.ui_base_url.rstrip('/')}/assets/{name}/{WAL_ARCHIVE}"
            report = send_alert(config, _alert(name, health, link))
            context.log.info(
                f"{name}: WAL archive {state}; alert delivered to {report.delivered or 'no notifier'}"
                + (f", failed: {list(report.failed)}" if report.failed else "")
            )
    return dg.SensorResult(asset_events=events, cursor=json.dumps(states, sort_keys=True))


@dg.definitions
def pitr_sensors() -> dg.Definitions:
    if not pitr_targets():
        return dg.Definitions()
    return dg.Definitions(sensors=[wal_archive_sensor])
