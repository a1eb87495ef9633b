"""The targets file: one YAML document declaring where backups go and which databases to back up.

Adding a database is a YAML edit. Structure and values are validated when the file is loaded;
environment variables (connection URLs, secrets) are resolved only when a target is used, so a
missing variable for one target never stops the others from loading or running.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backup_pipelines.engine.errors import ConfigError

CONFIG_ENV_VAR = "BACKUP_PIPELINES_CONFIG"
DEFAULT_CONFIG_NAME = "backup_targets.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

TARGET_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ENV_VAR_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DumpFormat = Literal["plain", "custom"]
Compression = Literal["gzip", "zstd", "none"]

DEFAULT_COMPRESSION_LEVEL: dict[str, int] = {"gzip": 6, "zstd": 3, "none": 0}
COMPRESSION_LEVEL_RANGE: dict[str, tuple[int, int]] = {
    "gzip": (1, 9),
    "zstd": (1, 19),
    "none": (0, 0),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestoreSettings(_Strict):
    """How restores into a target and its restore drills behave (key ``restore:`` of a target)."""

    rto_target_seconds: float = Field(
        default=3600,
        gt=0,
        description="Recovery time objective: a restore drill slower than this warns.",
    )
    drop_previous_after_hours: float | None = Field(
        default=None,
        ge=0,
        description=(
            "After a restore the replaced database is kept, renamed <db>_pre_restore_<UTC time>. "
            "Copies older than this many hours are dropped by the next restore of the target "
            "(0: drop it right after the swap); unset keeps them until an operator drops them."
        ),
    )
    maintenance_database: str = Field(
        default="postgres",
        description="Database to connect to for CREATE/ALTER/DROP DATABASE during a restore.",
    )


SQL_IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class MigrationSettings(_Strict):
    """Where a target's schema migrations live (drizzle-kit layout) and where they are recorded."""

    folder: Path = Field(
        description="drizzle-kit output folder (NNNN_<tag>.sql, NNNN_<tag>.down.sql, "
        "meta/_journal.json); relative paths resolve against the targets file."
    )
    table_schema: str = Field(default="drizzle", description="Schema of the tracking table.")
    table_name: str = Field(
        default="__drizzle_migrations", description="Name of the tracking table."
    )
    lock_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="How long a rollback waits for locks before giving up (nothing is changed).",
    )

    @field_validator("table_schema", "table_name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not SQL_IDENTIFIER_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a plain SQL identifier (letters, digits, _ and $)")
        return value


class TargetSettings(_Strict):
    """How one database is backed up."""

    dsn_env: str = Field(description="Environment variable holding the libpq connection URL.")
    description: str | None = None
    format: DumpFormat = "plain"
    compression: Compression = "gzip"
    compression_level: int | None = None
    pg_bin_dir: Path | None = Field(
        default=None,
        description="Folder with pg_dump/psql/pg_restore; default: the newest installed version.",
    )
    restore_jobs: int = Field(
        default=2, ge=1, le=64, description="pg_restore -j for custom format."
    )
    size_drop_warn_ratio: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Warn when a backup is smaller than the previous one by more than this share.",
    )
    scratch_dsn_env: str | None = Field(
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

    @field_validator("dsn_env", "scratch_dsn_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_VAR_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a valid environment variable name")
        return value

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

    @property
    def effective_compression_level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return DEFAULT_COMPRESSION_LEVEL[self.compression]


class Target(BaseModel):
    """A configured target with its name, as the engine uses it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    settings: TargetSettings
    backup_dir: Path
    # settings.migrations.folder resolved against the targets file (None: not configured).
    migrations_folder: Path | None = None

    def dsn(self) -> str:
        """The connection URL, read from the environment now."""
        return _read_env(self.name, "dsn_env", self.settings.dsn_env)

    def scratch_dsn(self) -> str:
        """Where restore tests create their scratch database."""
        if self.settings.scratch_dsn_env:
            return _read_env(self.name, "scratch_dsn_env", self.settings.scratch_dsn_env)
        return self.dsn()


def _read_env(target: str, field: str, variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(
            f"target '{target}', field '{field}': environment variable {variable} is not set",
            hint=f"export {variable}=postgresql://USER@HOST:5432/DBNAME (password in ~/.pgpass "
            "or in the URL), or fix the variable name in the targets file",
        )
    return value


class ProjectConfig(_Strict):
    """The whole targets file."""

    backup_root: Path
    timezone: str = "UTC"
    defaults: dict[str, Any] = Field(default_factory=dict)
    targets: dict[str, TargetSettings]
    source_path: Path | None = Field(default=None, exclude=True)

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
                name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec
                for name, spec in targets.items()
            }
        return data

    @field_validator("targets")
    @classmethod
    def _target_names(cls, value: dict[str, TargetSettings]) -> dict[str, TargetSettings]:
        for name in value:
            if not TARGET_NAME_PATTERN.match(name):
                raise ValueError(
                    f"target name {name!r} must start with a letter or underscore and contain only "
                    "letters, digits and underscores (it becomes a Dagster asset key prefix)"
                )
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

    @cached_property
    def resolved_backup_root(self) -> Path:
        return self.resolve_path(self.backup_root)

    def target(self, name: str) -> Target:
        if name not in self.targets:
            known = ", ".join(sorted(self.targets)) or "(none)"
            raise ConfigError(
                f"unknown target '{name}'",
                hint=f"use one of: {known}; or add it under 'targets:' in {self.source_path}",
            )
        settings = self.targets[name]
        return Target(
            name=name,
            settings=settings,
            backup_dir=self.resolved_backup_root / name,
            migrations_folder=(
                self.resolve_path(settings.migrations.folder) if settings.migrations else None
            ),
        )

    def all_targets(self) -> list[Target]:
        return [self.target(name) for name in self.targets]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_config_path() -> Path:
    """``$BACKUP_PIPELINES_CONFIG``, else ``./backup_targets.yaml``, else the project's own."""
    env = os.environ.get(CONFIG_ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    if local.exists():
        return local.resolve()
    return PROJECT_ROOT / DEFAULT_CONFIG_NAME


def format_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's error list into lines naming the target and the field."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see README 'Configuration')"
        if len(loc) >= 2 and loc[0] == "targets":
            field = ".".join(loc[2:]) or "(the target itself)"
            lines.append(f"target '{loc[1]}', field '{field}': {message}")
        else:
            lines.append(f"field '{'.'.join(loc) or '(top level)'}': {message}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None) -> ProjectConfig:
    """Read and validate the targets file. Raises ConfigError with every problem listed."""
    config_path = Path(path).expanduser().resolve() if path else default_config_path()
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"targets file not found: {config_path}",
            hint=f"create it (see backup_targets.yaml in the project) or set {CONFIG_ENV_VAR}",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"targets file {config_path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"targets file {config_path} must be a mapping with 'backup_root' and 'targets'"
        )
    try:
        return ProjectConfig.model_validate({**raw, "source_path": config_path})
    except ValidationError as exc:
        raise ConfigError(
            f"invalid targets file {config_path}:\n{format_validation_error(exc)}"
        ) from None
