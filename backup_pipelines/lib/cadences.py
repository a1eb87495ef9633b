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

Using it from an area (e.g. ``defs/restore/schedules.py``)::

    from backup_pipelines.lib.cadences import build_cadence_schedules

    @dg.definitions
    def restore_drill_schedules() -> dg.Definitions:
        return dg.Definitions(schedules=build_cadence_schedules(
            kind="restore_drill",
            # A fresh backup and its drill in one run: the drill always tests tonight's backup.
            asset_names=["logical_backup", "restore_drill"],
            default_cadences=["weekly"],
        ))

This gives one RUNNING schedule per set of cadences in use. Targets with the same cadences share
a schedule: one cadence gives ``<cadence>_<kind>_schedule`` (``weekly_restore_drill_schedule``; a
raw cron string gives ``cron_<fields>_<kind>_schedule``), several give one schedule with all
their cron strings, named by joining the cadence names with ``_and_`` in the target's order
(a high-traffic target: ``daily_and_hourly_backup_schedule``). Dagster runs such a schedule once
per distinct time, so when two cadences fire at the same moment (``hourly`` and ``daily`` at
02:00) the target is backed up once, and each target is in exactly one schedule per kind.

Each tick requests one run per target of its schedule, selecting ``<target>/<asset_name>`` for
every name in ``asset_names``, with ``run_key`` ``<kind>:<target>:<tick time>`` (a tick never
runs twice) and the run tags of ``backup_pipelines.lib.tags`` (target, database server, kind,
and cadence: the first of the target's cadences whose cron string matches the tick's time of
day, ``custom`` for a raw cron string).
"""

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import dagster as dg
from croniter import croniter

from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.lib.names import target_key
from backup_pipelines.lib.partitions import (
    current_databases,
    database_partitions,
    server_job_name,
    server_targets,
    single_targets,
)
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.tags import (
    TAG_CADENCE,
    TAG_KIND,
    job_tags,
    target_run_tags,
)

BACKUP_KIND = "backup"
HIGH_TRAFFIC_CADENCE = "hourly"


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
        cadences = tuple(dict.fromkeys(settings.schedules[kind]))
    else:
        cadences = tuple(dict.fromkeys(default_cadences))
    if kind == BACKUP_KIND and settings.high_traffic and HIGH_TRAFFIC_CADENCE not in cadences:
        cadences = (*cadences, HIGH_TRAFFIC_CADENCE)
    return cadences


def _cadence_slug(cadence: str) -> str:
    if re.fullmatch(r"[a-z][a-z0-9_]*", cadence):
        return cadence
    slug = (
        cadence.replace("*", "x")
        .replace("/", "every")
        .replace(",", "and")
        .replace("-", "to")
        .replace(" ", "_")
    )
    return f"cron_{re.sub(r'[^A-Za-z0-9_]', '_', slug)}"


def schedule_name(kind: str, cadences: Sequence[str]) -> str:
    """``<cadence>_<kind>_schedule``; several cadences joined with ``_and_`` in their order."""
    return f"{'_and_'.join(_cadence_slug(c) for c in cadences)}_{kind}_schedule"


def _every_hour_first(crons: Sequence[str]) -> list[str]:
    """The cron strings for one schedule, those that run every hour first.

    Dagster (1.13) merges a list of cron strings by comparing local times, which cannot tell
    apart the two 02:00s of the night the clocks go back: listed after ``0 2 * * *`` (which runs
    at the second 02:00), ``0 * * * *`` loses its run at the first 02:00. Listed first, it keeps
    both, and the merged list runs at every time any of its cron strings runs.
    """
    unique = list(dict.fromkeys(crons))
    return sorted(unique, key=lambda cron: croniter.expand(cron)[0][1] != ["*"])


def build_cadence_schedules(
    kind: str,
    asset_names: Sequence[str],
    default_cadences: Sequence[str] = ("weekly",),
    *,
    job_name: str | None = None,
    targets: Iterable[str] | None = None,
    description: str | None = None,
) -> list[dg.ScheduleDefinition]:
    """One RUNNING schedule per set of cadences used by targets for ``kind`` (see the module doc).

    ``asset_names``: the asset names under each target to run (``<target>/<name>``), upstream
    first. ``default_cadences``: for targets whose ``schedules:`` does not mention ``kind``.
    ``job_name``: an asset job covering those assets, defined by the caller next to the
    schedules; by default one named ``scheduled_<kind>`` is made. ``targets``: restrict to these
    targets (default: every configured target).

    A server target (``databases: all``) gets a job and schedules of its own (a job cannot mix
    partitions definitions): ``<job>_<target>`` and ``<cadence>_<kind>_<target>_schedule``,
    whose ticks request one run per database (partition); callers leave server targets out of
    the selection of ``job_name`` (``lib.partitions.single_targets``).
    """
    config = project_config()
    names = list(targets) if targets is not None else list(config.targets)
    schedules = _schedules_of(
        kind, asset_names, default_cadences, job_name, single_targets(names, config), description
    )
    for server in server_targets(config):
        if server in names:
            job = server_job_name(job_name or f"scheduled_{kind}", server)
            schedules += _schedules_of(
                kind, asset_names, default_cadences, job, [server], description, server=server
            )
    return schedules


def _schedules_of(
    kind: str,
    asset_names: Sequence[str],
    default_cadences: Sequence[str],
    job_name: str | None,
    names: list[str],
    description: str | None,
    *,
    server: str | None = None,
) -> list[dg.ScheduleDefinition]:
    config = project_config()
    groups: dict[tuple[str, ...], list[str]] = {}
    for target in names:
        cadences = target_cadences(target, kind, default_cadences, config)
        if cadences:
            groups.setdefault(cadences, []).append(target)
    if not groups:
        return []
    job = None
    if job_name is None or server is not None:
        job = dg.define_asset_job(
            name=job_name or f"scheduled_{kind}",
            selection=dg.AssetSelection.assets(
                *[
                    target_key(t, n)
                    for members in groups.values()
                    for t in members
                    for n in asset_names
                ]
            ),
            description=f"Scheduled {kind.replace('_', ' ')} runs, one run per target"
            + (f" (of {server}: one run per database)." if server else "."),
            tags=job_tags(kind),
            partitions_def=database_partitions(server, config) if server else None,
        )
        job_name = None
    schedules = []
    for cadences, members in groups.items():
        crons = [config.cadence_cron(c) for c in cadences]
        if len(cadences) == 1:
            cron_schedule: str | list[str] = crons[0]
            when = f"on the {cadences[0]} cadence ({crons[0]}, {config.timezone})"
        else:
            cron_schedule = _every_hour_first(crons)
            when = (
                f"on the {' and '.join(cadences)} cadences ({' and '.join(crons)}, "
                f"{config.timezone}; once when they coincide)"
            )
        name = schedule_name(kind, cadences)
        if server is not None:
            name = name.removesuffix("_schedule") + f"_{server}_schedule"
        schedules.append(
            dg.ScheduleDefinition(
                name=name,
                cron_schedule=cron_schedule,
                execution_timezone=config.timezone,
                job=job,
                job_name=job_name,
                execution_fn=_cadence_tick(kind, cadences, members, asset_names, config),
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description=(description or f"Scheduled {kind.replace('_', ' ')}")
                + f" {when} for: {', '.join(members)}.",
            )
        )
    return schedules


def _cadence_label(cadences: Sequence[str], moment: datetime, config: ProjectConfig) -> str:
    """The cadence a tick is for: the first whose cron string matches its local time of day (the
    first listed when none does: a time the clocks skipped runs at the end of the gap)."""
    wall = moment.astimezone(ZoneInfo(config.timezone)).replace(tzinfo=None)
    due = next((c for c in cadences if croniter.match(config.cadence_cron(c), wall)), cadences[0])
    return due if due in config.named_cadences else "custom"


def _cadence_tick(
    kind: str,
    cadences: tuple[str, ...],
    members: Sequence[str],
    asset_names: Sequence[str],
    config: ProjectConfig,
) -> Callable[[dg.ScheduleEvaluationContext], Iterator[dg.RunRequest]]:
    def evaluate(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
        moment = context.scheduled_execution_time or datetime.now(UTC)
        label = _cadence_label(cadences, moment, config)
        for target in members:
            tags = {**target_run_tags(target, config), TAG_KIND: kind, TAG_CADENCE: label}
            selection = [target_key(target, name) for name in asset_names]
            if not config.targets[target].is_server:
                yield dg.RunRequest(
                    run_key=f"{kind}:{target}:{moment.isoformat()}",
                    asset_selection=selection,
                    tags=tags,
                )
                continue
            # A server target: one run per database the partitions list now, so one failing
            # database never hides another.
            databases = current_databases(context.instance, target)
            if not databases:
                context.log.warning(
                    f"target '{target}' has no databases yet: server_databases_sensor adds "
                    "them (is it running, and can it reach the server?)"
                )
            for database in databases:
                yield dg.RunRequest(
                    run_key=f"{kind}:{target}:{database}:{moment.isoformat()}",
                    asset_selection=selection,
                    partition_key=database,
                    tags=tags,
                )

    return evaluate
