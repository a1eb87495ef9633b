"""The targets file as the Dagster definitions see it when they load."""

import os
from collections.abc import Callable
from functools import cache

import dagster as dg

from backup_pipelines.engine.config import ProjectConfig, TargetSettings, load_config


@cache
def project_config() -> ProjectConfig:
    """The targets file as it was when the definitions loaded (decides which assets exist).

    A target with invalid settings is left out of ``targets`` (its problems are in
    ``broken_targets`` and shown by a placeholder asset), so it never stops the code location
    or the other targets' assets, checks, jobs and schedules. Runs and sensors read the file
    again through the ``backup_engine`` resource, so an edit applies to the next run.
    """
    return set_aside_unschedulable(load_config(isolate_targets=True))


@cache
def dagster_accepts_cron(cron: str) -> bool:
    """Whether Dagster's scheduler takes ``cron``: a schedule is built with it and rejected or not."""
    try:
        dg.ScheduleDefinition(name="cron_check", cron_schedule=cron, job_name="cron_check")
    except dg.DagsterInvalidDefinitionError:
        return False
    return True


def set_aside_unschedulable(config: ProjectConfig) -> ProjectConfig:
    """Move targets with a cadence Dagster's own cron parser rejects to ``broken_targets``.

    The targets file is validated with the same parser, so this never happens unless the two
    disagree; if they ever do, only that target loses its schedules, not the code location.
    """
    rejected: dict[str, list[str]] = {}
    for name, settings in config.targets.items():
        for kind, cadences in settings.schedules.items():
            for cadence in cadences:
                cron = config.cadence_cron(cadence)
                if not dagster_accepts_cron(cron):
                    rejected.setdefault(name, []).append(
                        f"target '{name}', field 'schedules.{kind}': {cron!r} is not a cron "
                        "string Dagster's scheduler accepts"
                    )
    if not rejected:
        return config
    return config.model_copy(
        update={
            "targets": {n: s for n, s in config.targets.items() if n not in rejected},
            "broken_targets": {
                **config.broken_targets,
                **{n: "\n".join(lines) for n, lines in rejected.items()},
            },
        }
    )


# Derived from the cached project_config(), computed once per loaded config: the definitions ask
# for these once per target, and recomputing them each time made loading O(targets^2). The
# environment is part of the key: a bucket may come from $S3_BACKUP_BUCKET alone.
_DERIVED: dict[str, tuple[ProjectConfig, str | None, dict[str, TargetSettings]]] = {}


def _derived(what: str, pick: Callable[[TargetSettings], bool]) -> dict[str, TargetSettings]:
    config = project_config()
    environment = os.environ.get("S3_BACKUP_BUCKET")
    cached = _DERIVED.get(what)
    if cached is None or cached[0] is not config or cached[1] != environment:
        cached = (config, environment, {n: s for n, s in config.targets.items() if pick(s)})
        _DERIVED[what] = cached
    return cached[2]


def offsite_enabled_targets() -> dict[str, TargetSettings]:
    """Targets with offsite copies: `offsite.enabled`, or a bucket in config / $S3_BACKUP_BUCKET."""
    return _derived("offsite", lambda s: s.offsite.is_enabled)


def pitr_targets() -> dict[str, TargetSettings]:
    """Only targets with a ``pitr:`` block get PITR assets."""
    return _derived("pitr", lambda s: s.pitr is not None)


def invalid_target_message(name: str, problems: str, source: object) -> str:
    """What a target with invalid settings says, in its placeholder asset and in alerts."""
    lines = "; ".join(problems.splitlines())
    return (
        f"target '{name}' is not backed up: its settings in {source} are invalid: {lines}. "
        "Fix the targets file (`backup-pipelines check-config` lists every problem), then "
        "reload the code location; the other targets are not affected."
    )
