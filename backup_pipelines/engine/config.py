"""The targets file: one YAML document declaring where backups go and which databases to back up.

Adding a database is a YAML edit. Structure and values are validated when the file is loaded;
environment variables (connection URLs, secrets) are resolved only when a target is used, so a
missing variable for one target never stops the others from loading or running.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backup_pipelines.engine.errors import ConfigError

CONFIG_ENV_VAR = "BACKUP_PIPELINES_CONFIG"
DEFAULT_CONFIG_NAME = "backup_targets.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

TARGET_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ENV_VAR_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _valid_env_name(value: str) -> str:
    if not ENV_VAR_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid environment variable name")
    return value


# The name of an environment variable that holds a secret or a URL (never the value itself).
EnvVarName = Annotated[str, AfterValidator(_valid_env_name)]

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
        default=3600.0,
        gt=0,
        description="Recovery time objective: a restore drill slower than this warns.",
    )
    drop_previous_after_hours: float | None = Field(
        default=None,
        ge=0,
        description=(
            "After a restore the replaced database is kept, renamed <db>_pre_restore_<UTC time>. "
            "Copies older than this many hours are dropped by the next restore of the target "
            "or by `backup-pipelines restore-cleanup <target>` (0: drop it right after the "
            "swap); unset keeps them until an operator drops them."
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


# --- Running unattended: cadences, staleness, notifiers, metrics (README "Running in production") ---

# Named cadences every target can use in its `schedules:`; the top-level `cadences:` key adds
# names or overrides these. Times are in the targets file's `timezone`.
BUILTIN_CADENCES: dict[str, str] = {
    "hourly": "0 * * * *",
    "daily": "0 2 * * *",
    "weekly": "0 3 * * 0",
    "monthly": "0 4 1 * *",
}
CADENCE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_CRON_FIELD_PATTERN = re.compile(r"^[0-9A-Za-z*/,\-]+$")
_OPT_OUT_WORDS = {"off", "none", "never", "disabled"}
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def looks_like_cron(value: str) -> bool:
    """Five whitespace-separated cron fields (minute hour day-of-month month day-of-week)."""
    fields = value.split()
    return len(fields) == 5 and all(_CRON_FIELD_PATTERN.match(f) for f in fields)


def parse_duration(value: Any) -> Any:
    """``24h``, ``90m``, ``1h30m``, ``2d``, ``1w``, ``3600s`` or a number of seconds."""
    if value is False or (isinstance(value, str) and value.strip().lower() in _OPT_OUT_WORDS):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return timedelta(seconds=float(text))
        parts = _DURATION_PATTERN.findall(text)
        if not parts or _DURATION_PATTERN.sub("", text).strip():
            raise ValueError(
                f"{value!r} is not a duration: use e.g. 24h, 90m, 1h30m, 2d, 1w or seconds"
            )
        return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    return value


def _normalize_cadences(value: Any) -> Any:
    """A cadence name, a cron string, a list of them, or off/none/false/[] to opt out."""
    if value is None or value is False:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"{item!r} is not a cadence name or a cron string")
            if item.strip().lower() in _OPT_OUT_WORDS:
                continue
            items.append(" ".join(item.split()))
        return tuple(dict.fromkeys(items))
    raise ValueError(
        "a cadence is a name (hourly, daily, weekly, monthly or one under 'cadences:'), a cron "
        "string like '30 1 * * *', a list of those, or off"
    )


OptionalDuration = Annotated[timedelta | None, BeforeValidator(parse_duration)]
Cadences = Annotated[tuple[str, ...], BeforeValidator(_normalize_cadences)]


class EmailNotifierSettings(_Strict):
    """Alerts by email. The SMTP password comes from the environment variable ``password_env``."""

    type: Literal["email"]
    name: str = "email"
    host: str
    port: int | None = Field(default=None, description="Default: 587 (starttls), 465 (ssl), 25.")
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username_env: EnvVarName | None = None
    password_env: EnvVarName | None = None
    sender: str = Field(description="From: address.")
    to: list[str] = Field(min_length=1)
    ca_file: Path | None = Field(
        default=None, description="PEM bundle to trust instead of the system CAs (internal relay)."
    )
    timeout_seconds: float = Field(default=15, gt=0, le=300)

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"starttls": 587, "ssl": 465, "none": 25}[self.security]


class SlackNotifierSettings(_Strict):
    """Alerts to a Slack incoming webhook; its URL (a secret) comes from ``webhook_url_env``."""

    type: Literal["slack"]
    name: str = "slack"
    webhook_url_env: EnvVarName
    timeout_seconds: float = Field(default=15, gt=0, le=300)


class WebhookNotifierSettings(_Strict):
    """Alerts POSTed as JSON to any URL (``url``, or ``url_env`` when the URL holds a token)."""

    type: Literal["webhook"]
    name: str = "webhook"
    url: str | None = None
    url_env: EnvVarName | None = None
    bearer_token_env: EnvVarName | None = Field(
        default=None,
        description="Environment variable with a token sent as 'Authorization: Bearer'.",
    )
    timeout_seconds: float = Field(default=15, gt=0, le=300)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookNotifierSettings:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("set exactly one of 'url' and 'url_env'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("'url' must start with http:// or https://")
        return self


NotifierSettings = Annotated[
    EmailNotifierSettings | SlackNotifierSettings | WebhookNotifierSettings,
    Field(discriminator="type"),
]


class AlertSettings(_Strict):
    """How alerts are worded and linked (top-level key ``alerts:``)."""

    ui_base_url: str = Field(
        default="http://localhost:3000",
        description="Where operators open the Dagster UI; alerts link to <ui_base_url>/runs/<id>.",
    )
    send_resolved: bool = Field(
        default=True, description="Also notify when a stale target has a fresh backup again."
    )
    stale_check_interval_seconds: int = Field(default=300, ge=30, le=86400)


class MetricsSettings(_Strict):
    """Prometheus export (top-level key ``metrics:``): a node_exporter textfile and/or a Pushgateway."""

    textfile: Path | None = Field(
        default=None,
        description="e.g. /var/lib/prometheus/node-exporter/backup_pipelines.prom (written atomically).",
    )
    pushgateway_url: str | None = Field(default=None, description="e.g. http://pushgateway:9091")
    pushgateway_job: str = "backup_pipelines"
    interval_seconds: int = Field(default=60, ge=15, le=86400)


WAL_S3_URL_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")


class PitrSettings(_Strict):
    """Point-in-time recovery for a target (key ``pitr:``): WAL archive, base backups, drills.

    Only targets with this block get WAL archiving, base backups and PITR drills.
    """

    archive_dir: Path | None = Field(
        default=None,
        description=(
            "Absolute path of the local WAL archive. `archive_command` runs as the server's OS "
            "user, so this folder must be writable by it (`backup-pipelines wal-setup` creates it)."
        ),
    )
    archive_s3: str | None = Field(
        default=None,
        description="WAL archive in S3, e.g. s3://bucket/wal/production (also or instead of archive_dir).",
    )
    wal_compression: Compression = "zstd"
    command: str | None = Field(
        default=None,
        description=(
            "How the server's OS user runs this tool (used in restore_command and the printed "
            "archive_command); default: this installation's backup-pipelines executable."
        ),
    )
    server_os_user: str = Field(
        default="postgres", description="OS user that owns restored data directories (when root)."
    )
    archive_lag_limit_minutes: float = Field(
        default=30,
        gt=0,
        description=(
            "Alert when finished WAL segments wait longer than this to be archived, or (server "
            "unreachable) the newest archived segment is older than this. Keep it above archive_timeout."
        ),
    )
    base_backup_compression: Compression = "zstd"
    drill_port: int | None = Field(
        default=None,
        ge=1024,
        le=65535,
        description="Port of the drill's scratch server; default: a free one.",
    )
    drill_dir: Path | None = Field(
        default=None,
        description="Folder for the drill's scratch data directory; default: the system temp dir.",
    )
    drill_timeout_minutes: float = Field(default=30, gt=0)
    archive_check_interval_seconds: int = Field(default=120, ge=30, le=86400)

    @field_validator("archive_dir", "drill_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_absolute():
            raise ValueError(
                f"{value} must be an absolute path (archive_command runs as the server's OS user "
                "in the data directory, where relative paths mean something else)"
            )
        return value.expanduser() if value is not None else None

    @field_validator("archive_s3")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None and not WAL_S3_URL_PATTERN.match(value):
            raise ValueError(f"{value!r} is not an s3://bucket/prefix URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _somewhere(self) -> PitrSettings:
        if self.archive_dir is None and self.archive_s3 is None:
            raise ValueError("set archive_dir and/or archive_s3: the WAL archive needs a place")
        return self


def _absolute_key_path(value: Path | None) -> Path | None:
    if value is None:
        return None
    path = value.expanduser()
    if not path.is_absolute():
        raise ValueError(f"{value}: key and passphrase files need an absolute path (or ~/...)")
    return path


class PassphraseSource(_Strict):
    """Where one passphrase comes from: an environment variable or a 0600 file (never the YAML)."""

    env: EnvVarName | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PassphraseSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        _absolute_key_path(self.file)
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"


class EncryptionSettings(_Strict):
    """OpenPGP encryption of a target's backups (key ``encryption:`` of a target).

    ``passphrase``: symmetric AES-256 with the passphrase from ``passphrase_env`` or
    ``passphrase_file``. ``public_key``: encrypted to every key in ``public_key_files`` (the
    backup host needs no secret). Old passphrases / secret keys listed for decryption keep older
    backups restorable after a key rotation.
    """

    mode: Literal["none", "passphrase", "public_key"] = "none"
    passphrase_env: EnvVarName | None = Field(
        default=None, description="Variable holding the passphrase that encrypts new backups."
    )
    passphrase_file: Path | None = Field(
        default=None, description="0600 file holding that passphrase (first line)."
    )
    previous_passphrases: list[PassphraseSource] = Field(
        default_factory=list,
        description="Older passphrases, tried (by fingerprint) to decrypt older backups.",
    )
    public_key_files: list[Path] = Field(
        default_factory=list,
        description="ASCII-armored public keys new backups are encrypted to (public_key mode).",
    )
    secret_key_files: list[Path] = Field(
        default_factory=list,
        description=(
            "Secret keys for restores (current and old); only needed on hosts that restore."
        ),
    )
    secret_key_passphrase_env: EnvVarName | None = Field(
        default=None, description="Variable with the passphrase protecting the secret keys."
    )

    @field_validator("passphrase_file")
    @classmethod
    def _file(cls, value: Path | None) -> Path | None:
        return _absolute_key_path(value)

    @field_validator("public_key_files", "secret_key_files")
    @classmethod
    def _files(cls, value: list[Path]) -> list[Path]:
        return [p for p in (_absolute_key_path(v) for v in value) if p is not None]

    @model_validator(mode="after")
    def _mode_has_key(self) -> EncryptionSettings:
        if self.mode == "passphrase" and (self.passphrase_env is None) == (
            self.passphrase_file is None
        ):
            raise ValueError(
                "mode 'passphrase' needs exactly one of passphrase_env or passphrase_file"
            )
        if self.mode == "public_key" and not self.public_key_files:
            raise ValueError("mode 'public_key' needs public_key_files (ASCII-armored public keys)")
        return self

    @property
    def current_passphrase(self) -> PassphraseSource | None:
        if self.mode != "passphrase":
            return None
        return PassphraseSource(env=self.passphrase_env, file=self.passphrase_file)


StorageClass = Literal[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
    "REDUCED_REDUNDANCY",
]


class LifecycleSettings(_Strict):
    """The bucket lifecycle rule `backup-pipelines s3-lifecycle` prints or applies (0 = off)."""

    glacier_after_days: int = Field(default=30, ge=0)
    deep_archive_after_days: int = Field(default=90, ge=0)
    expire_after_days: int = Field(default=365, ge=0)
    abort_incomplete_uploads_after_days: int = Field(default=7, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LifecycleSettings:
        steps = [
            d
            for d in (self.glacier_after_days, self.deep_archive_after_days, self.expire_after_days)
            if d
        ]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError(
                "lifecycle days must grow: glacier_after_days < deep_archive_after_days "
                "< expire_after_days (0 turns a step off)"
            )
        return self


class OffsiteSettings(_Strict):
    """Offsite copies on S3 (key ``offsite:`` of a target)."""

    enabled: bool | None = Field(
        default=None,
        description="Default: on when a bucket is configured here or in $S3_BACKUP_BUCKET.",
    )
    bucket: str | None = Field(default=None, description="Default: $S3_BACKUP_BUCKET.")
    prefix: str = Field(default="", description="Objects go to s3://bucket/<prefix>/<target>/.")
    storage_class: StorageClass = "STANDARD"
    sse: Literal["AES256", "aws:kms", "none"] = "AES256"
    kms_key_id: str | None = None
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)

    @model_validator(mode="after")
    def _kms(self) -> OffsiteSettings:
        if self.kms_key_id and self.sse != "aws:kms":
            raise ValueError("kms_key_id needs sse: aws:kms")
        return self

    def resolved_bucket(self) -> str | None:
        return self.bucket or os.environ.get("S3_BACKUP_BUCKET", "").strip() or None

    @property
    def is_enabled(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self.resolved_bucket() is not None


class RetentionSettings(_Strict):
    """Calendar retention (key ``retention:`` of a target): keep the newest backup of each of the
    last ``daily`` days, ``weekly`` ISO weeks and ``monthly`` months that have a backup, and
    never fewer than the newest ``daily`` verified backups (see ``engine.retention``)."""

    daily: int = Field(default=7, ge=0)
    weekly: int = Field(default=4, ge=0)
    monthly: int = Field(default=12, ge=0)
    partial_max_age_hours: float = Field(
        default=24,
        gt=0,
        description="`.partial` leftovers of crashed runs older than this are removed.",
    )


class TargetSettings(_Strict):
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
    restore_jobs: int = Field(
        default=2, ge=1, le=64, description="pg_restore -j for custom format."
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
    db_host: str | None = Field(
        default=None,
        description=(
            "Name of the database server, for the per-host concurrency limit; default: host:port "
            "of the connection URL (when set at load time), else the target name."
        ),
    )

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
    cadences: dict[str, str] = Field(
        default_factory=dict,
        description="Named cadences (cron strings) added to hourly, daily, weekly and monthly.",
    )
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    notifiers: list[NotifierSettings] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
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

    @field_validator("cadences")
    @classmethod
    def _cadence_definitions(cls, value: dict[str, str]) -> dict[str, str]:
        for name, cron in value.items():
            if not CADENCE_NAME_PATTERN.match(name):
                raise ValueError(f"cadence name {name!r}: use lower-case letters, digits and _")
            if not looks_like_cron(cron):
                raise ValueError(f"cadence {name!r}: {cron!r} is not a 5-field cron string")
        return value

    @model_validator(mode="after")
    def _known_cadences(self) -> ProjectConfig:
        for target, settings in self.targets.items():
            for kind, cadences in settings.schedules.items():
                for cadence in cadences:
                    if cadence not in self.named_cadences and not looks_like_cron(cadence):
                        known = ", ".join(sorted(self.named_cadences))
                        raise ValueError(
                            f"target '{target}', schedules.{kind}: unknown cadence {cadence!r} "
                            f"(use one of {known}, a cron string like '30 1 * * *', or off)"
                        )
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
