"""Sensors that tell people when something is wrong, before anyone needs a restore.

- ``stale_backup_sensor``: a target's newest successful backup is older than its ``max_age``
  (default 24h): one alert per incident, one "resolved" when a fresh backup lands.
- ``run_failure_alert_sensor``: a failed run (backup, offsite copy, drill, ...): one alert per
  target of the run, naming what failed, why, and linking to the run in the UI.
- ``failed_check_alert_sensor``: an ERROR-severity asset check that did not pass (a tampered or
  unreadable backup, a copy that does not match): one alert per failed evaluation.
- ``backup_metrics_sensor``: writes the Prometheus textfile / pushes to the Pushgateway.

All are RUNNING by default. Their cursors live in the Dagster instance, so restarts of the
daemon neither repeat nor lose alerts. Notifiers come from the targets file (``notifiers:``),
read at every tick.
"""

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.listing import future_dated, future_note, human_age
from backup_pipelines.engine.metrics import export
from backup_pipelines.engine.notify import Alert, send_alert
from backup_pipelines.lib.names import LOGICAL_BACKUP, WAL_ARCHIVE_HEALTHY
from backup_pipelines.lib.project import invalid_target_message, project_config
from backup_pipelines.lib.status import (
    backup_in_progress,
    collect_metrics,
    newest_backup_timestamp,
    read_status,
)
from backup_pipelines.lib.tags import TAG_TARGET

MAX_REASON_CHARS = 1500
CHECK_HISTORY_PER_TICK = 50
# Checks whose area alerts (and resolves) through the notifiers itself: no second alert here.
SELF_ALERTING_CHECKS = {WAL_ARCHIVE_HEALTHY}


def run_url(config: ProjectConfig, run_id: str) -> str:
    return f"{config.alerts.ui_base_url.rstrip('/')}/runs/{run_id}"


def asset_url(config: ProjectConfig, key: dg.AssetKey) -> str:
    return f"{config.alerts.ui_base_url.rstrip('/')}/assets/{'/'.join(key.path)}"


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _human_duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _load_config(backup_engine: BackupEngineResource, context: Any) -> ProjectConfig | None:
    try:
        return backup_engine.project()
    except BackupPipelinesError as exc:
        context.log.error(f"cannot read the targets file: {exc}")
        return None


# ---------------------------------------------------------------------------------------------
# Stale backups
# ---------------------------------------------------------------------------------------------


def _stale_alert(
    config: ProjectConfig, target: str, newest: float | None, first_seen: float, now: float
) -> Alert:
    max_age = config.targets[target].max_age or timedelta(0)
    key = dg.AssetKey([target, LOGICAL_BACKUP])
    if newest is None:
        since = datetime.fromtimestamp(first_seen, UTC)
        message = (
            f"No successful backup of {target} has been recorded since monitoring started "
            f"{human_age(since)} ago ({since.isoformat(timespec='seconds')}); max_age is "
            f"{_human_duration(max_age.total_seconds())}."
        )
        reason = "no backup at all"
    else:
        finished = datetime.fromtimestamp(newest, UTC)
        message = (
            f"The newest successful backup of {target} finished {_human_duration(now - newest)} ago "
            f"({finished.isoformat(timespec='seconds')}), more than its max_age of "
            f"{_human_duration(max_age.total_seconds())}."
        )
        reason = "newest backup older than max_age"
    ahead = future_dated(list_artifacts(config.target(target).backup_dir))
    if ahead:
        message += (
            f" {len(ahead)} backup(s) dated in the future were not counted (newest "
            f"{ahead[0].path.name}: {future_note(ahead[0])})."
        )
    return Alert(
        title="backup is stale",
        message=message
        + " Check that the dagster-daemon runs and the backup schedules are on, then look at "
        "the latest backup runs.",
        target=target,
        what=LOGICAL_BACKUP,
        reason=reason,
        link=asset_url(config, key),
        incident=f"stale:{target}",
    )


def _fresh_alert(config: ProjectConfig, target: str, newest: float, stale_since: float) -> Alert:
    finished = datetime.fromtimestamp(newest, UTC)
    return Alert(
        title="fresh backup again",
        message=(
            f"A new backup of {target} finished at {finished.isoformat(timespec='seconds')}; "
            f"the stale-backup alert raised {_human_duration(time.time() - stale_since)} ago is "
            "resolved."
        ),
        severity="resolved",
        target=target,
        what=LOGICAL_BACKUP,
        link=asset_url(config, dg.AssetKey([target, LOGICAL_BACKUP])),
        incident=f"stale:{target}",
    )


def evaluate_staleness(
    context: dg.SensorEvaluationContext, config: ProjectConfig, now: float
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """New cursor state and what happened. State per target: ``first_seen`` (for targets never
    backed up) and ``alerted`` (when the open incident's alert went out)."""
    try:
        previous = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        previous = {}
    state: dict[str, dict[str, float]] = {}
    events = []
    watched = [t for t, settings in config.targets.items() if settings.max_age is not None]
    # The newest backup of every watched target, in one query.
    snapshot = read_status(context.instance, [dg.AssetKey([t, LOGICAL_BACKUP]) for t in watched])
    for target in watched:
        settings = config.targets[target]
        assert settings.max_age is not None
        entry = dict(previous.get(target) or {"first_seen": now})
        newest = newest_backup_timestamp(context.instance, config, target, snapshot)
        reference = newest if newest is not None else entry.get("first_seen", now)
        stale = now - reference > settings.max_age.total_seconds()
        if (
            stale
            and "alerted" not in entry
            and backup_in_progress(context.instance, target, snapshot)
        ):
            # The scheduled backup is on its way (max_age is reached while it runs): wait for it.
            events.append(f"{target}: stale, backup in progress")
        elif stale and "alerted" not in entry:
            report = send_alert(
                config,
                _stale_alert(config, target, newest, entry["first_seen"], now),
                log=context.log,
            )
            # Every notifier failed: keep the incident unannounced so the next tick retries.
            if report.delivered or not report.failed:
                entry["alerted"] = now
                events.append(f"{target}: stale, alerted")
            else:
                events.append(f"{target}: stale, alert not delivered (will retry)")
        elif not stale and "alerted" in entry:
            if config.alerts.send_resolved and newest is not None:
                send_alert(
                    config, _fresh_alert(config, target, newest, entry["alerted"]), log=context.log
                )
            del entry["alerted"]
            events.append(f"{target}: fresh again, resolved")
        state[target] = entry
    return state, events


INVALID_PREFIX = "invalid:"


def evaluate_invalid_targets(
    context: dg.SensorEvaluationContext, config: ProjectConfig, now: float
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Alert once per target whose settings are invalid (again when its problems change), and
    once more when it is valid again. Such a target is not backed up at all, so waiting for it
    to turn stale would hide the reason."""
    try:
        previous = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        previous = {}
    state: dict[str, dict[str, Any]] = {}
    events = []
    for name, problems in config.broken_targets.items():
        incident = INVALID_PREFIX + name
        entry = dict(previous.get(incident) or {})
        if entry.get("problems") != problems:
            report = send_alert(
                config,
                Alert(
                    title="target not backed up: invalid settings",
                    message=invalid_target_message(name, problems, config.source_path),
                    target=name,
                    what="targets file",
                    reason="invalid settings",
                    incident=incident,
                ),
                log=context.log,
            )
            if report.delivered or not report.failed:
                entry = {"problems": problems, "alerted": now}
                events.append(f"{name}: invalid settings, alerted")
            else:
                events.append(f"{name}: invalid settings, alert not delivered (will retry)")
        state[incident] = entry
    for incident, entry in previous.items():
        if not incident.startswith(INVALID_PREFIX) or incident in state:
            continue
        name = incident.removeprefix(INVALID_PREFIX)
        if entry.get("alerted") and config.alerts.send_resolved and name in config.targets:
            send_alert(
                config,
                Alert(
                    title="target settings valid again",
                    message=f"The settings of {name} in {config.source_path} are valid again; "
                    "its backups and schedules are back.",
                    severity="resolved",
                    target=name,
                    what="targets file",
                    incident=incident,
                ),
                log=context.log,
            )
            events.append(f"{name}: settings valid again, resolved")
    return state, events


@dg.sensor(
    name="stale_backup_sensor",
    minimum_interval_seconds=project_config().alerts.stale_check_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts once when a target's newest successful backup is older than its max_age "
    "(default 24h), and once more when a fresh backup lands. Backups taken with the CLI count too. "
    "A target whose settings in the targets file are invalid is alerted at once.",
)
def stale_backup_sensor(
    context: dg.SensorEvaluationContext, backup_engine: BackupEngineResource
) -> dg.SensorResult:
    config = _load_config(backup_engine, context)
    if config is None:
        return dg.SensorResult(skip_reason="the targets file cannot be read (see the tick log)")
    now = time.time()
    state, events = evaluate_staleness(context, config, now)
    stale = sorted(t for t, entry in state.items() if "alerted" in entry)
    invalid_state, invalid_events = evaluate_invalid_targets(context, config, now)
    state.update(invalid_state)
    events += invalid_events
    summary = "; ".join(events) or (f"still stale: {', '.join(stale)}" if stale else "all fresh")
    return dg.SensorResult(skip_reason=summary, cursor=json.dumps(state, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Failed runs
# ---------------------------------------------------------------------------------------------


def _failed_check_steps(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    """Steps of the run whose failure is a failed ERROR check (failed_check_alert_sensor
    reports those, with the check's own reason)."""
    steps = set()
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if (
            isinstance(evaluation, dg.AssetCheckEvaluation)
            and not evaluation.passed
            and evaluation.severity == dg.AssetCheckSeverity.ERROR
            and entry.step_key
        ):
            steps.add(entry.step_key)
    return steps


def _assets_of_steps(
    instance: dg.DagsterInstance, run: dg.DagsterRun
) -> dict[str, list[dg.AssetKey]]:
    """The assets each step of the run materializes (from its execution plan), among those the
    run selected: one op can hold many targets' assets, so the step name alone says little."""
    selected = set(run.asset_selection or set())
    found: dict[str, list[dg.AssetKey]] = {}
    snapshot = (
        instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        if run.execution_plan_snapshot_id
        else None
    )
    for step in snapshot.steps if snapshot is not None else []:
        for output in step.outputs:
            key = output.properties.asset_key if output.properties is not None else None
            if key is not None and key in selected:
                found.setdefault(step.key, []).append(key)
    return found


def _failure_reason(event: dg.DagsterEvent) -> str:
    data = event.step_failure_data
    if data is None:
        return event.message or "unknown error"
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    if data.error is not None:
        return data.error.message
    return event.message or "unknown error"


def run_failure_alerts(context: dg.RunFailureSensorContext, config: ProjectConfig) -> list[Alert]:
    run = context.dagster_run
    link = run_url(config, run.run_id)
    reported_by_checks = _failed_check_steps(context.instance, run.run_id)
    step_assets = _assets_of_steps(context.instance, run)
    failures = [
        e for e in context.get_step_failure_events() if e.step_key not in reported_by_checks
    ]
    if not failures and reported_by_checks:
        return []
    run_target = run.tags.get(TAG_TARGET)
    if not failures:
        message = context.failure_event.message or "the run failed before any step ran"
        return [
            Alert(
                title=f"run of {run.job_name} failed",
                message=f"Run {run.run_id} of job {run.job_name} failed.",
                target=run_target,
                what=run.job_name,
                reason=_short(message),
                link=link,
                incident=f"run:{run.run_id}",
            )
        ]
    by_target: dict[str | None, list[tuple[str, str]]] = {}
    for event in failures:
        keys = [k for k in step_assets.get(event.step_key or "", []) if len(k.path) > 1]
        targets = {k.path[0] for k in keys}
        # A step of several targets' assets (one op for many targets) names them in its reason.
        target = targets.pop() if len(targets) == 1 else run_target
        what = (
            ", ".join(dict.fromkeys("/".join(k.path[1:]) for k in keys))
            if keys
            else (event.step_key or run.job_name)
        )
        by_target.setdefault(target, []).append((what, _failure_reason(event)))
    alerts = []
    for target, items in by_target.items():
        what = ", ".join(dict.fromkeys(w for w, _ in items))
        reason = "\n".join(f"{w}: {r}" if len(items) > 1 else r for w, r in items)
        alerts.append(
            Alert(
                title=f"{what} failed",
                message=f"Run {run.run_id} of job {run.job_name} failed"
                + (f" for target {target}." if target else "."),
                target=target,
                what=what,
                reason=_short(reason),
                link=link,
                incident=f"run:{run.run_id}:{target}",
            )
        )
    return alerts


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="One alert per failed run and target (backups, offsite copies, drills, restores), "
    "with the reason and a link to the run in the UI.",
)
def run_failure_alert_sensor(
    context: dg.RunFailureSensorContext, backup_engine: BackupEngineResource
) -> None:
    config = _load_config(backup_engine, context)
    if config is None:
        return
    for alert in run_failure_alerts(context, config):
        send_alert(config, alert, log=context.log)


# ---------------------------------------------------------------------------------------------
# Failed ERROR checks
# ---------------------------------------------------------------------------------------------


def _check_reason(evaluation: dg.AssetCheckEvaluation) -> str:
    for key in ("reason", "result"):
        value = evaluation.metadata.get(key)
        if value is not None:
            return str(getattr(value, "value", value))
    return evaluation.description or "the check did not pass"


def check_failure_alert(
    config: ProjectConfig, evaluation: dg.AssetCheckEvaluation, run_id: str
) -> Alert:
    key = evaluation.asset_key
    target = key.path[0] if len(key.path) > 1 and key.path[0] in config.targets else None
    asset = "/".join(key.path[1:]) if target else key.to_user_string()
    return Alert(
        title=f"check {evaluation.check_name} failed on {asset}",
        message=f"The ERROR check {evaluation.check_name} on {key.to_user_string()} did not pass: "
        "do not rely on this backup until the cause is found.",
        target=target,
        what=f"{asset} check {evaluation.check_name}",
        reason=_short(_check_reason(evaluation)),
        link=run_url(config, run_id),
        incident=f"check:{key.to_user_string()}:{evaluation.check_name}:{run_id}",
    )


def _new_check_results(
    instance: dg.DagsterInstance, check_keys: list[dg.AssetCheckKey], after_id: int
) -> tuple[list[tuple[int, dg.AssetCheckEvaluation, str]], int]:
    """ERROR-severity evaluations recorded after ``after_id`` (ids of the check-execution table
    grow across all runs, also with per-run SQLite storage), oldest first; and the newest id."""
    results = []
    newest = after_id
    # One query for the latest execution of every check; the history only of those that ran.
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    for check_key in check_keys:
        record = latest.get(check_key)
        if record is None or record.id <= after_id:
            continue
        history = instance.event_log_storage.get_asset_check_execution_history(
            check_key, limit=CHECK_HISTORY_PER_TICK
        )
        for record in history:
            if record.id <= after_id:
                continue
            newest = max(newest, record.id)
            event = record.event.dagster_event if record.event else None
            evaluation = event.event_specific_data if event else None
            if (
                isinstance(evaluation, dg.AssetCheckEvaluation)
                and evaluation.severity == dg.AssetCheckSeverity.ERROR
            ):
                results.append((record.id, evaluation, record.run_id))
    return sorted(results, key=lambda item: item[0]), newest


def _incident(evaluation: dg.AssetCheckEvaluation) -> str:
    """What a failure is about: the materialization it checked, or (for checks that sensors
    evaluate on a schedule, like the WAL archive's) the check itself until it passes again."""
    target = evaluation.target_materialization_data
    return f"materialization:{target.storage_id}" if target is not None else "ongoing"


def _read_check_cursor(cursor: str) -> tuple[int, dict[str, str]]:
    if cursor.isdigit():  # the first tick stores only the starting point
        return int(cursor), {}
    state = json.loads(cursor)
    return int(state["after_id"]), dict(state.get("failing") or {})


@dg.sensor(
    name="failed_check_alert_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="One alert when an ERROR asset check fails (tampered, truncated or unreadable "
    "backups, offsite copies that do not match, failed drills, WAL archive gaps); repeated "
    "failures of the same check on the same backup stay quiet until it passes again.",
)
def failed_check_alert_sensor(
    context: dg.SensorEvaluationContext, backup_engine: BackupEngineResource
) -> dg.SensorResult:
    check_keys = sorted(
        (
            k
            for k in (
                context.repository_def.asset_graph.asset_check_keys
                if context.repository_def
                else ()
            )
            if k.name not in SELF_ALERTING_CHECKS
        ),
        key=str,
    )
    if context.cursor is None:
        # First tick ever: start from now instead of alerting about history.
        latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(
            check_keys
        )
        newest = max((record.id for record in latest.values()), default=0)
        return dg.SensorResult(skip_reason="watching check results from now on", cursor=str(newest))
    config = _load_config(backup_engine, context)
    if config is None:
        return dg.SensorResult(skip_reason="the targets file cannot be read (see the tick log)")
    after_id, failing = _read_check_cursor(context.cursor)
    results, newest = _new_check_results(context.instance, check_keys, after_id)
    alerted = []
    for _, evaluation, run_id in results:
        check = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        if evaluation.passed:
            failing.pop(check, None)
            continue
        incident = _incident(evaluation)
        if failing.get(check) == incident:
            continue  # the same failure seen again (a re-run, a periodic evaluation)
        failing[check] = incident
        send_alert(config, check_failure_alert(config, evaluation, run_id), log=context.log)
        alerted.append(check)
    summary = f"alerted: {', '.join(alerted)}" if alerted else "no new failed ERROR checks"
    cursor = json.dumps({"after_id": newest, "failing": failing}, sort_keys=True)
    return dg.SensorResult(skip_reason=summary, cursor=cursor)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dg.sensor(
    name="backup_metrics_sensor",
    minimum_interval_seconds=project_config().metrics.interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Exports per-target backup, restore-drill and offsite-copy metrics for Prometheus "
    "(node_exporter textfile and/or Pushgateway, see `metrics:` in the targets file).",
)
def backup_metrics_sensor(
    context: dg.SensorEvaluationContext, backup_engine: BackupEngineResource
) -> dg.SkipReason:
    config = _load_config(backup_engine, context)
    if config is None:
        return dg.SkipReason("the targets file cannot be read (see the tick log)")
    settings = config.metrics
    if not settings.textfile and not settings.pushgateway_url:
        return dg.SkipReason(
            "metrics export is off: set metrics.textfile or metrics.pushgateway_url"
        )
    metrics = collect_metrics(context.instance, config)
    problems = export(settings, metrics, log=context.log)
    if problems:
        return dg.SkipReason("; ".join(problems))
    return dg.SkipReason(f"exported metrics for {len(metrics)} targets")


@dg.definitions
def monitoring_sensors() -> dg.Definitions:
    return dg.Definitions(
        sensors=[
            stale_backup_sensor,
            run_failure_alert_sensor,
            failed_check_alert_sensor,
            backup_metrics_sensor,
        ]
    )
