"""Server targets (``databases: all``) in Dagster: one dynamic partition per database.

Each server target has a ``DynamicPartitionsDefinition`` named ``<target>_databases``; its
``logical_backup``, ``offsite_copy`` and ``restore_drill`` assets (and their checks) are
partitioned by it, so the UI shows, database by database, which ones have a fresh, verified,
drilled backup. ``server_databases_sensor`` (``defs/backups/sensors.py``) keeps the partitions
in step with the server. Jobs cannot mix partitions definitions, so every job that works on a
server target is a job of its own (``server_job_name``).
"""

from functools import cache

import dagster as dg

from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.lib.project import project_config


def partitions_name(target: str) -> str:
    return f"{target}_databases"


@cache
def _partitions(target: str) -> dg.DynamicPartitionsDefinition:
    # One object per name: every asset of the target shares it.
    return dg.DynamicPartitionsDefinition(name=partitions_name(target))


def database_partitions(
    target: str, config: ProjectConfig | None = None
) -> dg.DynamicPartitionsDefinition | None:
    """The partitions of a server target's assets; None for a single-database target."""
    config = config or project_config()
    settings = config.targets.get(target)
    return _partitions(target) if settings is not None and settings.is_server else None


def server_targets(config: ProjectConfig | None = None) -> list[str]:
    config = config or project_config()
    return [name for name, settings in config.targets.items() if settings.is_server]


def single_targets(names: list[str], config: ProjectConfig | None = None) -> list[str]:
    """``names`` without the server targets (those go into jobs of their own)."""
    servers = set(server_targets(config))
    return [name for name in names if name not in servers]


def server_job_name(job: str, target: str) -> str:
    """The job of one server target doing what ``job`` does for the single-database targets."""
    return f"{job}_{target}"


def partition_database(context: dg.AssetExecutionContext) -> str | None:
    """The database a run of a server target's asset works on (its partition), else None."""
    return context.partition_key if context.has_partition_key else None


def current_databases(instance: dg.DagsterInstance, target: str) -> list[str]:
    """The databases the partitions of ``target`` list now (what schedules run)."""
    return list(instance.get_dynamic_partitions(partitions_name(target)))
