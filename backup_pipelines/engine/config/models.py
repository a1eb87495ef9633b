"""A target's settings, the target as the engine uses it, and the whole targets file."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backup_pipelines.engine.config.cron import (
    BUILTIN_CADENCES,
    CADENCE_NAME_PATTERN,
    SCHEDULE_KINDS,
    Cadences,
    cron_problem,
    looks_like_cron,
)
from backup_pipelines.engine.config.fields import (
    COMPRESSION_LEVEL_RANGE,
    DEFAULT_COMPRESSION_LEVEL,
    Compression,
    DatabasePattern,
    DumpFormat,
    EnvVarName,
    OptionalDuration,
    ServerDatabases,
    StrictModel,
    absolute_path,
)
from backup_pipelines.engine.config.monitoring import (
    AlertSettings,
    MetricsSettings,
    NotifierSettings,
)
from backup_pipelines.engine.config.settings import (
    EncryptionSettings,
    MigrationSettings,
    OffsiteSettings,
    PitrSettings,
    RestoreSettings,
    RetentionSettings,
)
from backup_pipelines.engine.errors import ConfigError

TARGET_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


DEFAULT_LOCK_WAIT_TIMEOUT = timedelta(minutes=5)
DEFAULT_DIRECTORY_JOBS = 2
MIN_LOCK_WAIT_TIMEOUT = timedelta(seconds=1)
MAX_LOCK_WAIT_TIMEOUT = timedelta(hours=24)


class TargetSettings(StrictModel):
    """How one database is backed up."""

    dsn_env: EnvVarName = Field(
        description="Environment variable holding the libpq connection URL."
    )
    description: str | None = None
    format: DumpFormat = "plain"
    compression: Compression = "gzip"
    compression_level: int | None = None
    pg_bin_dir: Path | None = Field(
        default=None,
        description="Folder with pg_dump/psql/pg_restore; default: the newest installed version.",
    )
    jobs: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="pg_dump -j: tables dumped in parallel, in one snapshot (directory format "
        "only; default 2 for it).",
    )
    restore_jobs: int = Field(
        default=2, ge=1, le=64, description="pg_restore -j for custom and directory format."
    )
    size_drop_warn_ratio: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Warn when a backup is smaller than the previous one by more than this share.",
    )
    scratch_dsn_env: EnvVarName | None = Field(
        default=None,
        description=(
            "Environment variable with a connection URL for restore tests (any database on the "
            "scratch server); default: the target's own server."
        ),
    )
    migrations: MigrationSettings | None = Field(
        default=None, description="Schema migrations of this database, for `rollback`."
    )

    restore: RestoreSettings = Field(
        default_factory=RestoreSettings, description="Restore and restore-drill settings."
    )
    encryption: EncryptionSettings = Field(
        default_factory=EncryptionSettings, description="OpenPGP encryption of the backups."
    )
    offsite: OffsiteSettings = Field(
        default_factory=OffsiteSettings, description="Offsite copies on S3."
    )
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings, description="Calendar (daily/weekly/monthly) retention."
    )
    pitr: PitrSettings | None = Field(
        default=None,
        description="Point-in-time recovery (WAL archive, base backups, PITR drills); off when unset.",
    )
    schedules: dict[str, Cadences] = Field(
        default_factory=dict,
        description=(
            "When each kind of scheduled work runs for this target, e.g. {backup: [daily], "
            "restore_drill: weekly, pitr_drill: off}; a kind left out uses its area's default."
        ),
    )
    high_traffic: bool = Field(default=False, description="Also back up every hour.")
    max_age: OptionalDuration = Field(
        default=timedelta(hours=24),
        description="Alert when the newest successful backup is older than this (e.g. 24h, 2h); "
        "off: never (a target backed up elsewhere).",
    )
    lock_wait_timeout: OptionalDuration = Field(
        default=DEFAULT_LOCK_WAIT_TIMEOUT,
        description="How long a backup waits for a table lock another session holds (e.g. a "
        "stuck migration) before it fails, naming that session (pg_dump --lock-wait-timeout); "
        "off: wait as long as it takes.",
    )
    db_host: str | None = Field(
        default=None,
        description=(
            "Name of the database server, for the per-host concurrency limit; default: host:port "
            "of the connection URL (when set at load time), else the target name."
        ),
    )
    databases: ServerDatabases | None = Field(
        default=None,
        description=(
            "all: the target is a whole server, every database on it is backed up on its own "
            "(the connection URL's database is only where the list is read); unset: the one "
            "database of the connection URL."
        ),
    )
    exclude: tuple[DatabasePattern, ...] = Field(
        default=(),
        description="With databases: all, glob patterns (fnmatch, case-sensitive) of databases "
        "not to back up, e.g. [postgres, 'scratch_*']; template0 and template1 never are.",
    )

    @field_validator("lock_wait_timeout")
    @classmethod
    def _lock_wait_in_range(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and not MIN_LOCK_WAIT_TIMEOUT <= value <= MAX_LOCK_WAIT_TIMEOUT:
            raise ValueError(
                "lock_wait_timeout must be between 1s and 24h (or off to wait without limit)"
            )
        return value

    @field_validator("pg_bin_dir")
    @classmethod
    def _absolute_bin_dir(cls, value: Path | None) -> Path | None:
        return absolute_path(value, "pg_bin_dir")

    @field_validator("schedules")
    @classmethod
    def _schedule_kinds(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for kind in value:
            if kind not in SCHEDULE_KINDS:
                raise ValueError(
                    f"unknown kind of scheduled work {kind!r} (use {', '.join(SCHEDULE_KINDS)})"
                )
        return value

    @field_validator("databases", mode="before")
    @classmethod
    def _databases_all(cls, value: Any) -> Any:
        if value is not None and value != "all":
            raise ValueError(
                f"{value!r} is not supported: use 'databases: all' for every database of the "
                "server (with exclude: patterns), or leave it out for the connection URL's database"
            )
        return value

    @model_validator(mode="after")
    def _server_target_fields(self) -> TargetSettings:
        if self.exclude and self.databases is None:
            raise ValueError(
                "exclude applies only to a server target: add 'databases: all' or remove exclude"
            )
        if self.databases is not None and self.migrations is not None:
            raise ValueError(
                "migrations belong to one database, not to a server target with databases: all; "
                "declare that database as a target of its own for migrations"
            )
        return self

    @property
    def is_server(self) -> bool:
        """A target that names a server (``databases: all``) instead of one database."""
        return self.databases is not None

    @model_validator(mode="after")
    def _level_in_range(self) -> TargetSettings:
        if self.compression_level is not None:
            low, high = COMPRESSION_LEVEL_RANGE[self.compression]
            if not low <= self.compression_level <= high:
                raise ValueError(
                    f"compression_level {self.compression_level} is out of range for "
                    f"{self.compression} ({low}..{high})"
                )
        return self

    @model_validator(mode="after")
    def _jobs_need_directory(self) -> TargetSettings:
        if self.jobs is not None and self.jobs > 1 and self.format != "directory":
            raise ValueError(
                f"jobs: {self.jobs} needs format: directory (pg_dump dumps tables in parallel "
                f"only into a directory); set format: directory or remove jobs"
            )
        return self

    @property
    def dump_jobs(self) -> int:
        """pg_dump's parallel jobs: ``jobs``, or 2 for the directory format, 1 for the others."""
        if self.jobs is not None:
            return self.jobs
        return DEFAULT_DIRECTORY_JOBS if self.format == "directory" else 1

    @property
    def effective_compression_level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return DEFAULT_COMPRESSION_LEVEL[self.compression]


class Target(BaseModel):
    """A configured target with its name, as the engine uses it.

    For a server target (``databases: all``) the target itself stands for the server (its
    ``dsn`` is where the list of databases is read, :mod:`engine.databases`), and
    :meth:`for_database` gives the target of one of its databases: same settings, its own
    ``backup_dir`` (``<backup_root>/<target>/<database>``) and a ``dsn`` naming that database.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    settings: TargetSettings
    backup_dir: Path
    # settings.migrations.folder resolved against the targets file (None: not configured).
    migrations_folder: Path | None = None
    # One database of a server target; None for a single-database target or the server itself.
    database: str | None = None

    @property
    def is_server(self) -> bool:
        """The whole server of a ``databases: all`` target (not one of its databases)."""
        return self.settings.is_server and self.database is None

    @property
    def label(self) -> str:
        """``target 'prod'``, or ``target 'prod', database 'app'``, for messages."""
        if self.database is None:
            return f"target '{self.name}'"
        return f"target '{self.name}', database '{self.database}'"

    @property
    def storage_name(self) -> str:
        """The target's folder under backup_root and under the offsite prefix."""
        if self.database is None:
            return self.name
        return f"{self.name}/{database_folder_name(self.database)}"

    def for_database(self, database: str) -> Target:
        """The target of one database of this server target."""
        if not self.settings.is_server:
            raise ConfigError(
                f"target '{self.name}' is one database (the one of its connection URL), "
                f"so it takes no database name ({database!r})",
                hint="leave out --database, or make the target a server with 'databases: all'",
            )
        server_dir = self.backup_dir if self.database is None else self.backup_dir.parent
        return self.model_copy(
            update={"database": database, "backup_dir": server_dir / database_folder_name(database)}
        )

    def dsn(self) -> str:
        """The connection URL, read from the environment now (naming :attr:`database`, if set)."""
        dsn = _read_env(self.name, "dsn_env", self.settings.dsn_env)
        if self.database is None:
            return dsn
        from backup_pipelines.engine.conninfo import ConnectionInfo

        info = ConnectionInfo.parse(dsn, source=f"target '{self.name}' ({self.settings.dsn_env})")
        return info.with_dbname(self.database).conninfo()

    def scratch_dsn(self) -> str:
        """Where restore tests create their scratch database."""
        if self.settings.scratch_dsn_env:
            return _read_env(self.name, "scratch_dsn_env", self.settings.scratch_dsn_env)
        return self.dsn()


def database_folder_name(database: str) -> str:
    """The folder of one database of a server target: its name, percent-encoded where it holds
    a character a folder name cannot (``/``, ``%``, a leading dot) so that every database gets
    a folder of its own inside the target's."""
    folder = quote(database, safe="")
    if folder.startswith("."):
        folder = "%2E" + folder[1:]
    return folder


def _read_env(target: str, field: str, variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(
            f"target '{target}', field '{field}': environment variable {variable} is not set",
            hint=f"export {variable}=postgresql://USER@HOST:5432/DBNAME (password in ~/.pgpass "
            "or in the URL), or fix the variable name in the targets file",
        )
    return value


def target_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a target name (it becomes a Dagster asset key prefix)."""
    if isinstance(name, str) and TARGET_NAME_PATTERN.match(name):
        return None
    return (
        f"target name {name!r} must start with a letter or underscore and contain only "
        "letters, digits and underscores (it becomes a Dagster asset key prefix)"
    )


def unknown_cadences(settings: TargetSettings, named: dict[str, str]) -> list[str]:
    """``field 'schedules.<kind>': ...`` for each cadence that is neither named nor cron."""
    problems = []
    for kind, cadences in settings.schedules.items():
        for cadence in cadences:
            if cadence not in named and not looks_like_cron(cadence):
                known = ", ".join(sorted(named))
                problems.append(
                    f"field 'schedules.{kind}': unknown cadence {cadence!r} (use one of {known}, "
                    "a cron string like '30 1 * * *', or off)"
                )
    return problems


class ProjectConfig(StrictModel):
    """The whole targets file."""

    backup_root: Path
    timezone: str = "UTC"
    defaults: dict[str, Any] = Field(default_factory=dict)
    targets: dict[str, TargetSettings]
    cadences: dict[str, str] = Field(
        default_factory=dict,
        description="Named cadences (cron strings) added to hourly, daily, weekly and monthly.",
    )
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    notifiers: list[NotifierSettings] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    source_path: Path | None = Field(default=None, exclude=True)
    # Targets whose own settings are invalid (name -> the problems, one per line). They are left
    # out of ``targets`` so every other target keeps working; see ``load_config``.
    broken_targets: dict[str, str] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults") or {}
        targets = data.get("targets")
        if isinstance(defaults, dict) and isinstance(targets, dict):
            data = dict(data)
            data["targets"] = {
                name: deep_merge(defaults, spec) if isinstance(spec, dict) else spec
                for name, spec in targets.items()
            }
        return data

    @field_validator("backup_root", mode="before")
    @classmethod
    def _backup_root_given(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                "backup_root is empty: set it to the folder that holds the backups (absolute, "
                "or relative to the targets file), e.g. /var/backups/postgres"
            )
        return value

    @field_validator("targets")
    @classmethod
    def _target_names(cls, value: dict[str, TargetSettings]) -> dict[str, TargetSettings]:
        for name in value:
            problem = target_name_problem(name)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    def resolve_path(self, path: Path) -> Path:
        """An absolute path; a relative one is taken relative to the targets file."""
        path = path.expanduser()
        if not path.is_absolute():
            base = self.source_path.parent if self.source_path else Path.cwd()
            path = base / path
        return path.resolve()

    @field_validator("cadences")
    @classmethod
    def _cadence_definitions(cls, value: dict[str, str]) -> dict[str, str]:
        for name, cron in value.items():
            if not CADENCE_NAME_PATTERN.match(name):
                raise ValueError(f"cadence name {name!r}: use lower-case letters, digits and _")
            problem = cron_problem(cron)
            if problem:
                raise ValueError(f"cadence {name!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _known_cadences(self) -> ProjectConfig:
        for target, settings in self.targets.items():
            for problem in unknown_cadences(settings, self.named_cadences):
                raise ValueError(f"target '{target}', {problem}")
        return self

    @property
    def named_cadences(self) -> dict[str, str]:
        return {**BUILTIN_CADENCES, **self.cadences}

    def cadence_cron(self, cadence: str) -> str:
        """The cron string of a named cadence, or the cadence itself when it is a cron string."""
        return self.named_cadences.get(cadence, cadence)

    @cached_property
    def resolved_backup_root(self) -> Path:
        return self.resolve_path(self.backup_root)

    def target(self, name: str, database: str | None = None) -> Target:
        """The target ``name``; with ``database``, that database of a server target."""
        if name in self.broken_targets:
            problems = [
                line.removeprefix(f"target '{name}', ").removeprefix(f"target '{name}': ")
                for line in self.broken_targets[name].splitlines()
            ]
            raise ConfigError(
                f"target '{name}' cannot be used, its settings are invalid: " + "; ".join(problems),
                hint=f"fix it in {self.source_path} (`backup-pipelines check-config` lists every "
                "problem); the other targets are not affected",
            )
        if name not in self.targets:
            known = ", ".join(sorted(self.targets)) or "(none)"
            raise ConfigError(
                f"unknown target '{name}'",
                hint=f"use one of: {known}; or add it under 'targets:' in {self.source_path}",
            )
        settings = self.targets[name]
        target = Target(
            name=name,
            settings=settings,
            backup_dir=self.resolved_backup_root / name,
            migrations_folder=(
                self.resolve_path(settings.migrations.folder) if settings.migrations else None
            ),
        )
        return target if database is None else target.for_database(database)

    def all_targets(self) -> list[Target]:
        return [self.target(name) for name in self.targets]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
