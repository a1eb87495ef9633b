"""Schedules built from per-target cadences in ``backup_targets.yaml``: one helper for every area.

How a target says when its scheduled work runs (times in the targets file's ``timezone``)::

    cadences:                  # optional: more named cadences (cron strings)
      nightly_late: "30 4 * * *"
    targets:
      production:
        high_traffic: true     # adds "hourly" to the backup cadences
        schedules:
          backup: [daily]      # a cadence name, a cron string, a list, or off
          restore_drill: weekly
          pitr_drill: off      # opt out of one kind of scheduled work

Built-in cadences: ``hourly`` (every hour on the hour), ``daily`` (02:00), ``weekly`` (Sunday
03:00) and ``monthly`` (the 1st at 04:00), the guide's cron lines.

Using it from another area (e.g. ``defs/restore/schedules.py``)::

    from backup_pipelines.defs.cadences import build_cadence_schedules

    @dg.definitions
    def restore_drill_schedules() -> dg.Definitions:
        return dg.Definitions(schedules=build_cadence_schedules(
            kind="restore_drill",
            # A fresh backup and its drill in one run: the drill always tests tonight's backup.
            asset_names=["logical_backup", "restore_drill"],
            default_cadences=["weekly"],
        ))

This gives one RUNNING schedule per cadence in use, named ``<cadence>_<kind>_schedule``
(``weekly_restore_drill_schedule``; a raw cron string gives ``cron_<fields>_<kind>_schedule``).
Each tick requests one run per target whose cadences include it, selecting
``<target>/<asset_name>`` for every name in ``asset_names``, with ``run_key``
``<kind>:<target>:<tick time>`` (a tick never runs twice) and these run tags:

- ``backup_pipelines/target``: the target (``dagster.yaml`` allows one run per target at a time),
- ``backup_pipelines/db_host``: its database server (``dagster.yaml`` caps runs per server),
- ``backup_pipelines/kind`` and ``backup_pipelines/cadence``.

When two cadences of the same kind fire at the same moment for a target (``hourly`` and ``daily``
at 02:00), only the first one listed for the target requests a run, so the database is not
backed up twice in the same minute.
"""

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._utils.schedules import cron_string_iterator, is_valid_cron_string

from backup_pipelines.defs.shared import project_config, target_key
from backup_pipelines.engine.config import ProjectConfig

TAG_TARGET = "backup_pipelines/target"
TAG_DB_HOST = "backup_pipelines/db_host"
TAG_KIND = "backup_pipelines/kind"
TAG_CADENCE = "backup_pipelines/cadence"

BACKUP_KIND = "backup"
HIGH_TRAFFIC_CADENCE = "hourly"


def db_host(target: str, config: ProjectConfig | None = None) -> str:
    """The database server a target lives on: ``db_host`` from config, else host:port of its
    connection URL when the variable is set where the definitions load, else the target name."""
    config = config or project_config()
    settings = config.targets[target]
    if settings.db_host:
        return settings.db_host
    dsn = os.environ.get(settings.dsn_env, "").strip()
    if dsn.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(dsn)
            if parts.hostname:
                return f"{parts.hostname}:{parts.port or 5432}"
        except ValueError:
            pass
    return target


def host_pool(target: str, config: ProjectConfig | None = None) -> str:
    """Dagster pool for work that loads a target's database server (limit set in dagster.yaml)."""
    return "pg_host_" + re.sub(r"[^A-Za-z0-9_.:-]", "_", db_host(target, config))


def target_run_tags(target: str, config: ProjectConfig | None = None) -> dict[str, str]:
    """Tags that put a run under the per-target and per-server concurrency limits."""
    return {TAG_TARGET: target, TAG_DB_HOST: db_host(target, config)}


def target_cadences(
    target: str,
    kind: str,
    default_cadences: Sequence[str],
    config: ProjectConfig | None = None,
) -> tuple[str, ...]:
    """The cadences of ``kind`` for ``target``: its ``schedules.<kind>`` if set (empty when it
    opted out), else ``default_cadences``; high-traffic targets also back up hourly."""
    config = config or project_config()
    settings = config.targets[target]
    if kind in settings.schedules:
        cadences = tuple(settings.schedules[kind])
    else:
        cadences = tuple(default_cadences)
    if kind == BACKUP_KIND and settings.high_traffic and HIGH_TRAFFIC_CADENCE not in cadences:
        cadences = (*cadences, HIGH_TRAFFIC_CADENCE)
    return cadences


def schedule_name(kind: str, cadence: str) -> str:
    if re.fullmatch(r"[a-z][a-z0-9_]*", cadence):
        return f"{cadence}_{kind}_schedule"
    slug = (
        cadence.replace("*", "x")
        .replace("/", "every")
        .replace(",", "and")
        .replace("-", "to")
        .replace(" ", "_")
    )
    return f"cron_{re.sub(r'[^A-Za-z0-9_]', '_', slug)}_{kind}_schedule"


def fires_at(cron: str, moment: datetime, timezone: str) -> bool:
    """Whether ``cron`` has a tick exactly at ``moment`` (to the minute)."""
    moment = moment.replace(second=0, microsecond=0)
    upcoming = next(cron_string_iterator(moment.timestamp(), cron, timezone))
    return upcoming.timestamp() == moment.timestamp()


def build_cadence_schedules(
    kind: str,
    asset_names: Sequence[str],
    default_cadences: Sequence[str] = ("weekly",),
    *,
    job: UnresolvedAssetJobDefinition | None = None,
    targets: Iterable[str] | None = None,
    description: str | None = None,
) -> list[dg.ScheduleDefinition]:
    """One RUNNING schedule per cadence used by any target for ``kind`` (see the module doc).

    ``asset_names``: the asset names under each target to run (``<target>/<name>``), upstream
    first. ``default_cadences``: for targets whose ``schedules:`` does not mention ``kind``.
    ``job``: an asset job covering those assets; by default one named ``scheduled_<kind>`` is
    made. ``targets``: restrict to these targets (default: every configured target).
    """
    config = project_config()
    names = list(targets) if targets is not None else list(config.targets)
    per_target = {t: target_cadences(t, kind, default_cadences, config) for t in names}
    in_use = list(dict.fromkeys(c for cadences in per_target.values() for c in cadences))
    if not in_use:
        return []
    for cadence in in_use:
        if not is_valid_cron_string(config.cadence_cron(cadence)):
            raise dg.DagsterInvalidDefinitionError(
                f"cadence {cadence!r} ({config.cadence_cron(cadence)!r}) is not a cron string "
                "Dagster accepts; fix 'schedules:' or 'cadences:' in the targets file"
            )
    if job is None:
        job = dg.define_asset_job(
            name=f"scheduled_{kind}",
            selection=dg.AssetSelection.assets(
                *[target_key(t, n) for t in names if per_target[t] for n in asset_names]
            ),
            description=f"Scheduled {kind.replace('_', ' ')} runs, one run per target.",
        )
    return [
        _cadence_schedule(kind, cadence, asset_names, per_target, job, config, description)
        for cadence in in_use
    ]


def _cadence_schedule(
    kind: str,
    cadence: str,
    asset_names: Sequence[str],
    per_target: dict[str, tuple[str, ...]],
    job: UnresolvedAssetJobDefinition,
    config: ProjectConfig,
    description: str | None,
) -> dg.ScheduleDefinition:
    cron = config.cadence_cron(cadence)
    timezone = config.timezone
    members = [t for t, cadences in per_target.items() if cadence in cadences]
    label = cadence if cadence in config.named_cadences else "custom"

    def evaluate(context: dg.ScheduleEvaluationContext) -> Iterator[dg.SkipReason | dg.RunRequest]:
        moment = context.scheduled_execution_time or datetime.now(UTC)
        requests = []
        for target in members:
            # Another cadence listed earlier fires now too: its schedule covers this target.
            earlier = per_target[target][: per_target[target].index(cadence)]
            if any(fires_at(config.cadence_cron(c), moment, timezone) for c in earlier):
                continue
            requests.append(
                dg.RunRequest(
                    run_key=f"{kind}:{target}:{moment.isoformat()}",
                    asset_selection=[target_key(target, name) for name in asset_names],
                    tags={
                        **target_run_tags(target, config),
                        TAG_KIND: kind,
                        TAG_CADENCE: label,
                    },
                )
            )
        if not requests:
            yield dg.SkipReason(f"every target on the {cadence} cadence ran under another one")
        yield from requests

    return dg.ScheduleDefinition(
        name=schedule_name(kind, cadence),
        cron_schedule=cron,
        execution_timezone=timezone,
        job=job,
        execution_fn=evaluate,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=(description or f"Scheduled {kind.replace('_', ' ')}")
        + f" on the {cadence} cadence ({cron}, {timezone}) for: {', '.join(members)}.",
    )
