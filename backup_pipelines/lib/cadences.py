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

This gives one RUNNING schedule per cadence in use, named ``<cadence>_<kind>_schedule``
(``weekly_restore_drill_schedule``; a raw cron string gives ``cron_<fields>_<kind>_schedule``).
Each tick requests one run per target whose cadences include it, selecting
``<target>/<asset_name>`` for every name in ``asset_names``, with ``run_key``
``<kind>:<target>:<tick time>`` (a tick never runs twice) and the run tags of
``backup_pipelines.lib.tags`` (target, database server, kind and cadence).

When two cadences of the same kind fire at the same moment for a target (``hourly`` and ``daily``
at 02:00), only the first one listed for the target requests a run, so the database is not
backed up twice in the same minute. Each cadence keeps its own schedule (their names are what
people see and switch off), so this is decided when a tick is evaluated, with Dagster's own
rules for when a cron string fires (``fires_at``).
"""

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
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
# Hours in which Dagster's scheduler applies its daylight-saving rules (see fires_at).
DST_HOURS = frozenset({1, 2, 3})


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
    """Whether Dagster's scheduler runs ``cron`` (in ``timezone``) at ``moment``, to the minute.

    Dagster's documented rules for daylight saving time apply: a time the clocks skip when they
    go forward runs at the end of the gap (03:00 for a 02:30 schedule), except on a schedule
    that runs every hour, which skips it; a time that happens twice when the clocks go back
    runs once, at the second occurrence, except every hour, which runs at both. Like Dagster,
    the second-occurrence rule only applies between 01:00 and 03:59, where clocks change in
    most places; elsewhere the first occurrence runs.
    """
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(moment.replace(second=0, microsecond=0).timestamp(), zone)
    every_hour = croniter.expand(cron)[0][1] == ["*"]
    wall = local.replace(tzinfo=None, fold=0)
    if croniter.match(cron, wall):
        happens_twice = local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset()
        if every_hour or not happens_twice:
            return True
        return local.fold == (1 if local.hour in DST_HOURS else 0)
    if every_hour:
        return False
    # The first minute after the clocks went forward runs every time the jump skipped.
    before = datetime.fromtimestamp(local.timestamp() - 60, zone)
    jump = (local.utcoffset() or timedelta(0)) - (before.utcoffset() or timedelta(0))
    skipped = int(jump.total_seconds() // 60)
    return any(croniter.match(cron, wall - jump + timedelta(minutes=m)) for m in range(skipped))


def build_cadence_schedules(
    kind: str,
    asset_names: Sequence[str],
    default_cadences: Sequence[str] = ("weekly",),
    *,
    job_name: str | None = None,
    targets: Iterable[str] | None = None,
    description: str | None = None,
) -> list[dg.ScheduleDefinition]:
    """One RUNNING schedule per cadence used by any target for ``kind`` (see the module doc).

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
    per_target = {t: target_cadences(t, kind, default_cadences, config) for t in names}
    in_use = list(dict.fromkeys(c for cadences in per_target.values() for c in cadences))
    if not in_use:
        return []
    job = None
    if job_name is None or server is not None:
        job = dg.define_asset_job(
            name=job_name or f"scheduled_{kind}",
            selection=dg.AssetSelection.assets(
                *[target_key(t, n) for t in names if per_target[t] for n in asset_names]
            ),
            description=f"Scheduled {kind.replace('_', ' ')} runs, one run per target"
            + (f" (of {server}: one run per database)." if server else "."),
            tags=job_tags(kind),
            partitions_def=database_partitions(server, config) if server else None,
        )
        job_name = None
    schedules = []
    for cadence in in_use:
        cron = config.cadence_cron(cadence)
        members = [t for t, cadences in per_target.items() if cadence in cadences]
        schedules.append(
            dg.ScheduleDefinition(
                name=schedule_name(kind, cadence)
                if server is None
                else schedule_name(kind, cadence).removesuffix("_schedule") + f"_{server}_schedule",
                cron_schedule=cron,
                execution_timezone=config.timezone,
                job=job,
                job_name=job_name,
                execution_fn=_cadence_tick(kind, cadence, asset_names, per_target, config),
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description=(description or f"Scheduled {kind.replace('_', ' ')}")
                + f" on the {cadence} cadence ({cron}, {config.timezone}) for: "
                + f"{', '.join(members)}.",
            )
        )
    return schedules


def _cadence_tick(
    kind: str,
    cadence: str,
    asset_names: Sequence[str],
    per_target: dict[str, tuple[str, ...]],
    config: ProjectConfig,
) -> Callable[[dg.ScheduleEvaluationContext], Iterator[dg.SkipReason | dg.RunRequest]]:
    members = [t for t, cadences in per_target.items() if cadence in cadences]
    label = cadence if cadence in config.named_cadences else "custom"

    def evaluate(context: dg.ScheduleEvaluationContext) -> Iterator[dg.SkipReason | dg.RunRequest]:
        moment = context.scheduled_execution_time or datetime.now(UTC)
        requests = []
        for target in members:
            # Another cadence listed earlier fires now too: its schedule covers this target.
            earlier = per_target[target][: per_target[target].index(cadence)]
            if any(fires_at(config.cadence_cron(c), moment, config.timezone) for c in earlier):
                continue
            tags = {**target_run_tags(target, config), TAG_KIND: kind, TAG_CADENCE: label}
            selection = [target_key(target, name) for name in asset_names]
            if not config.targets[target].is_server:
                requests.append(
                    dg.RunRequest(
                        run_key=f"{kind}:{target}:{moment.isoformat()}",
                        asset_selection=selection,
                        tags=tags,
                    )
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
            requests.extend(
                dg.RunRequest(
                    run_key=f"{kind}:{target}:{database}:{moment.isoformat()}",
                    asset_selection=selection,
                    partition_key=database,
                    tags=tags,
                )
                for database in databases
            )
        if not requests:
            yield dg.SkipReason(f"every target on the {cadence} cadence ran under another one")
        yield from requests

    return evaluate
