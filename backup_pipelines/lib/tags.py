"""Tags, kinds and owners of every asset and job, and the run tags the concurrency limits use.

Run tags (on every run that works on one target; ``dagster.yaml`` limits runs per value):

- ``backup_pipelines/target``: the target (one run per target at a time, the rest queue),
- ``backup_pipelines/db_host``: its database server, where it is known,
- ``backup_pipelines/kind``: what the run does (``backup``, ``restore``, ...),
- ``backup_pipelines/cadence``: the cadence of a scheduled run.

Schedules and sensors set them on their run requests; runs launched by hand (the Launchpad, an
asset's "Materialize" button, ``dagster job launch``) get them from the run coordinator
(``backup_pipelines.lib.run_coordinator``), which reads the target from the run's assets or its
run config.
"""

import os
import re
from collections.abc import Iterable
from typing import TypedDict
from urllib.parse import urlsplit

from backup_pipelines.engine.config import ProjectConfig
from backup_pipelines.lib.project import project_config

TAG_TARGET = "backup_pipelines/target"
TAG_DB_HOST = "backup_pipelines/db_host"
TAG_KIND = "backup_pipelines/kind"
TAG_CADENCE = "backup_pipelines/cadence"

# Asset tag with the target's name (the asset list can be filtered by it).
ASSET_TAG_TARGET = "target"

# Who answers for the backups in the UI's owner filters (Dagster wants an email or `team:<name>`).
DEFAULT_OWNERS = ("team:backup_pipelines",)


class AssetAttributes(TypedDict):
    group_name: str
    kinds: set[str]
    tags: dict[str, str]
    owners: list[str]


def asset_attributes(target: str, kind: str, **tags: str) -> AssetAttributes:
    """Group, kind, tags and owners of one of a target's assets:
    ``@dg.asset(key=..., **asset_attributes(name, "postgres"))``."""
    return AssetAttributes(
        group_name=target,
        kinds={kind},
        tags={ASSET_TAG_TARGET: target, **tags},
        owners=list(DEFAULT_OWNERS),
    )


def job_tags(kind: str) -> dict[str, str]:
    """Tags of a job, which go on each of its runs. (No owners: on jobs and schedules they are
    still a beta parameter in Dagster 1.13, which warns on every load.)"""
    return {TAG_KIND: kind}


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


def unique_op_names(prefix: str, pools: Iterable[str]) -> dict[str, str]:
    """An op name for each pool (``<prefix>_<pool as an identifier>``), distinct even when two
    pools differ only in characters an op name cannot hold (``.`` and ``:`` become ``_``)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for pool in sorted(pools):
        base = f"{prefix}_" + re.sub(r"[^A-Za-z0-9_]", "_", pool.removeprefix("pg_host_"))
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names[pool] = name
    return names


def target_run_tags(target: str, config: ProjectConfig | None = None) -> dict[str, str]:
    """Tags that put a run under the per-target and per-server concurrency limits."""
    return {TAG_TARGET: target, TAG_DB_HOST: db_host(target, config)}
