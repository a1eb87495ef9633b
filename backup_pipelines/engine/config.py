"""The targets file: one YAML document declaring where backups go and which databases to back up.

Adding a database is a YAML edit. Structure and values are validated when the file is loaded;
environment variables (connection URLs, secrets) are resolved only when a target is used, so a
missing variable for one target never stops the others from loading or running.
"""

from __future__ import annotations

import os
import re
import stat
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
    # .inf / .nan in YAML would pass every "gt=0" bound and break time arithmetic later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
        le=87_600,
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
# Field names and what each accepts, for messages (cron's own ranges, as croniter checks them).
_CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
)
_DAYS_IN_MONTH = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}
_OPT_OUT_WORDS = {"off", "none", "never", "disabled"}
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = timedelta(days=3660)


def looks_like_cron(value: str) -> bool:
    """Several whitespace-separated fields: meant as a cron string (valid or not), never a
    cadence name (names have no spaces)."""
    return len(value.split()) > 1


def cron_problem(value: str) -> str | None:
    """Why ``value`` is not a cron string the schedules accept; None when it is.

    The same parser Dagster's schedules use (croniter) checks every field's range, names, lists,
    ranges and steps, plus Dagster's own rules (exactly five fields; no 30th or 31st of
    February). Only digits, names and ``* / , -`` are allowed, and a day that no listed month
    has is refused: such a schedule would never fire.
    """
    # Imported here: most runs (wal-push once per WAL segment) never check a cron string.
    from croniter import croniter

    fields = value.split()
    if len(fields) != 5:
        return (
            f"{value!r} has {len(fields)} field(s); a cron string has 5: minute hour "
            "day-of-month month day-of-week, e.g. '30 1 * * *'"
        )
    for index, (field, (label, allowed)) in enumerate(zip(fields, _CRON_FIELDS, strict=True)):
        if not _CRON_FIELD_PATTERN.match(field):
            return (
                f"{value!r}: the {label} field {field!r} may only use digits, names, "
                "'*', '/', ',' and '-'"
            )
        alone = " ".join(field if i == index else "*" for i in range(5))
        if not croniter.is_valid(alone):
            return (
                f"{value!r}: the {label} field {field!r} is not valid (values {allowed}; "
                "lists a,b; ranges a-b; steps */n or a-b/n)"
            )
    if not croniter.is_valid(value):
        return f"{value!r} is not a valid cron string"
    expanded, *_ = croniter.expand(value)
    if len(expanded) != 5:
        return f"{value!r} is not a five-field cron string"
    days, months, weekdays = expanded[2], expanded[3], expanded[4]
    if months == [2] and len(days) == 1 and days[0] in (30, 31):
        return f"{value!r}: February has no day {days[0]} (Dagster refuses this schedule)"
    numeric_days = [d for d in days if isinstance(d, int)]
    # With day-of-week unrestricted, the day must exist in one of the months.
    if (
        weekdays == ["*"]
        and months != ["*"]
        and numeric_days
        and len(numeric_days) == len(days)
        and min(numeric_days) > max(_DAYS_IN_MONTH[int(m)] for m in months)
    ):
        return f"{value!r} never fires: none of its months has that day"
    return None


def parse_duration(value: Any) -> Any:
    """``24h``, ``90m``, ``1h30m``, ``2d``, ``1w``, ``3600s`` or a number of seconds."""
    if value is False or (isinstance(value, str) and value.strip().lower() in _OPT_OUT_WORDS):
        return None
    try:
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
    except (OverflowError, ArithmeticError):
        raise ValueError(f"{value!r} is far too long a duration (at most 3660d)") from None
    return value


def _sensible_duration(value: timedelta | None) -> timedelta | None:
    if value is not None and not timedelta(0) < value <= MAX_DURATION:
        raise ValueError(
            f"{value} is not a sensible duration: more than 0 and at most 3660d (10 years)"
        )
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


DEFAULT_LOCK_WAIT_TIMEOUT = timedelta(minutes=5)
MIN_LOCK_WAIT_TIMEOUT = timedelta(seconds=1)
MAX_LOCK_WAIT_TIMEOUT = timedelta(hours=24)
# The kinds of scheduled work a target's ``schedules:`` may set (README "Running in production").
SCHEDULE_KINDS = ("backup", "restore_drill", "base_backup", "pitr_drill")


def _valid_crons(value: tuple[str, ...]) -> tuple[str, ...]:
    for cadence in value:
        problem = cron_problem(cadence) if looks_like_cron(cadence) else None
        if problem:
            raise ValueError(problem)
    return value


OptionalDuration = Annotated[
    timedelta | None, BeforeValidator(parse_duration), AfterValidator(_sensible_duration)
]
# Named cadences are checked against the file's `cadences:` by ProjectConfig; cron strings here.
Cadences = Annotated[
    tuple[str, ...], BeforeValidator(_normalize_cadences), AfterValidator(_valid_crons)
]


class EmailNotifierSettings(_Strict):
    """Alerts by email. The SMTP password comes from the environment variable ``password_env``."""

    type: Literal["email"]
    name: str = "email"
    host: str
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Default: 587 (starttls), 465 (ssl), 25."
    )
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username_env: EnvVarName | None = None
    password_env: EnvVarName | None = None
    sender: str = Field(description="From: address.")
    to: list[str] = Field(min_length=1)
    ca_file: Path | None = Field(
        default=None, description="PEM bundle to trust instead of the system CAs (internal relay)."
    )
    timeout_seconds: float = Field(default=15, gt=0, le=300)

    @field_validator("ca_file")
    @classmethod
    def _absolute_ca_file(cls, value: Path | None) -> Path | None:
        return _absolute_path(value, "ca_file")

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

    @field_validator("textfile")
    @classmethod
    def _absolute_textfile(cls, value: Path | None) -> Path | None:
        return _absolute_path(value, "metrics.textfile")


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
        le=525_600,
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
    drill_timeout_minutes: float = Field(default=30, gt=0, le=10_080)
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


def _absolute_path(value: Path | None, key: str) -> Path | None:
    """``~`` expanded; relative paths are refused: they would depend on the working directory
    of whoever runs the tool (cron, Dagster, PostgreSQL's archive_command)."""
    if value is None:
        return None
    path = value.expanduser()
    if str(value).strip() in {"", "."}:  # YAML '' arrives as Path('.')
        raise ValueError(f"{key} is empty: give an absolute path or leave the key out")
    if not path.is_absolute():
        raise ValueError(f"{key} must be an absolute path (or ~/...), not {str(value)!r}")
    return path


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

    glacier_after_days: int = Field(default=30, ge=0, le=36_500)
    deep_archive_after_days: int = Field(default=90, ge=0, le=36_500)
    expire_after_days: int = Field(default=365, ge=0, le=36_500)
    abort_incomplete_uploads_after_days: int = Field(default=7, ge=0, le=36_500)

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


MAX_RETENTION = {"daily": 3660, "weekly": 520, "monthly": 1200}


class RetentionSettings(_Strict):
    """Calendar retention (key ``retention:`` of a target): keep the newest backup of each of the
    last ``daily`` days, ``weekly`` ISO weeks and ``monthly`` months that have a backup, and
    never fewer than the newest ``daily`` verified backups (see ``engine.retention``)."""

    # Upper bounds: 10 years of days and weeks, 100 years of months. Larger numbers are typos
    # (and would make retention enumerate millions of periods).
    daily: int = Field(default=7, ge=0, le=MAX_RETENTION["daily"])
    weekly: int = Field(default=4, ge=0, le=MAX_RETENTION["weekly"])
    monthly: int = Field(default=12, ge=0, le=MAX_RETENTION["monthly"])
    partial_max_age_hours: float = Field(
        default=24,
        gt=0,
        le=8760,
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
        return _absolute_path(value, "pg_bin_dir")

    @field_validator("schedules")
    @classmethod
    def _schedule_kinds(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for kind in value:
            if kind not in SCHEDULE_KINDS:
                raise ValueError(
                    f"unknown kind of scheduled work {kind!r} (use {', '.join(SCHEDULE_KINDS)})"
                )
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
                name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec
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

    def target(self, name: str) -> Target:
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


def format_validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """Turn pydantic's error list into lines naming the target and the field."""
    lines = []
    for error in exc.errors():
        loc = [*prefix, *(str(part) for part in error["loc"])]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see README 'Configuration')"
        if len(loc) >= 2 and loc[0] == "targets":
            field = ".".join(loc[2:]) or "(the target itself)"
            lines.append(f"target '{loc[1]}', field '{field}': {message}")
        else:
            lines.append(f"field '{'.'.join(loc) or '(top level)'}': {message}")
    return "\n".join(lines)


# A targets file is a small hand-written document; anything this big is the wrong file.
MAX_CONFIG_BYTES = 16 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last of two equal keys: a second ``production:`` target would silently
    replace the first one.
    """


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` merges are meant to be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML reports it itself
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                f"{first.start_mark.line + 1}): a key may appear only once in a mapping; remove "
                "or rename one of them",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong, where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = ""
        if exc.problem_mark is not None:
            where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: "
        problem = exc.problem
        if exc.context and exc.context_mark is not None and "duplicate key" not in problem:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        return where + problem
    return " ".join(str(exc).split())


def read_targets_file(config_path: Path) -> Any:
    """The parsed YAML document, or ConfigError saying in one line why it cannot be read."""
    try:
        info = config_path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(
                f"targets file {config_path} is a folder, not a file",
                hint=f"point --config (or {CONFIG_ENV_VAR}) at the YAML file itself, e.g. "
                f"{config_path / DEFAULT_CONFIG_NAME}",
            )
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"targets file {config_path} is not a regular file",
                hint=f"point --config (or {CONFIG_ENV_VAR}) at the YAML file",
            )
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"targets file {config_path} is {info.st_size >> 20} MiB: far too big for a "
                "targets file",
                hint=f"check that --config (or {CONFIG_ENV_VAR}) names the right file",
            )
        data = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"targets file not found: {config_path}",
            hint=f"create it (see backup_targets.yaml in the project) or set {CONFIG_ENV_VAR}",
        ) from None
    except PermissionError:
        raise ConfigError(
            f"targets file {config_path} cannot be read by uid {os.geteuid()}: permission denied",
            hint="let every user that runs backup-pipelines read it (cron, the Dagster daemon "
            "and PostgreSQL's archive_command may each run as another user): chmod/chown it",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"targets file {config_path} cannot be read: {exc.strerror or exc}"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"targets file {config_path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on "
            f"line {line})",
            hint="save it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)",
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"targets file {config_path} is not valid YAML: {_yaml_error_line(exc)}"
        ) from None


def _set_aside_broken_targets(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate each target on its own: ``raw`` with only the healthy targets (validated), and
    the problems of every other one by name."""
    targets = raw.get("targets")
    defaults = raw.get("defaults") or {}
    if not isinstance(targets, dict) or not isinstance(defaults, dict):
        return raw, {}  # a top-level problem: reported for the whole file
    named = dict(BUILTIN_CADENCES)
    if isinstance(raw.get("cadences"), dict):
        named.update({str(k): v for k, v in raw["cadences"].items()})
    healthy: dict[str, Any] = {}
    broken: dict[str, str] = {}
    for name, spec in targets.items():
        label = str(name)
        problems = []
        name_problem = target_name_problem(name)
        if name_problem:
            problems.append(f"target '{label}': {name_problem}")
        merged = _deep_merge(defaults, spec) if isinstance(spec, dict) else spec
        try:
            settings = TargetSettings.model_validate(merged)
        except ValidationError as exc:
            problems.append(format_validation_error(exc, prefix=("targets", label)))
        else:
            problems += [f"target '{label}', {p}" for p in unknown_cadences(settings, named)]
        if problems:
            broken[label] = "\n".join(problems)
        else:
            healthy[name] = settings
    return {**raw, "targets": healthy}, broken


def load_config(
    path: str | os.PathLike[str] | None = None, *, isolate_targets: bool = False
) -> ProjectConfig:
    """Read and validate the targets file. Raises ConfigError with every problem listed.

    A problem in the file as a whole (unreadable, not YAML, a bad top-level key) always raises.
    A problem in one target's own settings raises too, unless ``isolate_targets``: then that
    target is left out of ``targets`` and its problems are kept in ``broken_targets`` (using it
    raises them), so one target's typo never stops the backups of the others. Everything that
    runs work (the command line, Dagster) loads the file that way; tests and tools that must
    see every problem at once load it strictly.
    """
    config_path = Path(path).expanduser().resolve() if path else default_config_path()
    raw = read_targets_file(config_path)
    if raw is None:
        raise ConfigError(
            f"targets file {config_path} is empty",
            hint="it needs at least 'backup_root' and 'targets' (see backup_targets.yaml in the "
            "project)",
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"targets file {config_path} must be a mapping with 'backup_root' and 'targets'"
        )
    raw, broken = _set_aside_broken_targets(raw)
    try:
        config = ProjectConfig.model_validate(
            {**raw, "source_path": config_path, "broken_targets": broken}
        )
    except ValidationError as exc:
        lines = [format_validation_error(exc), *broken.values()]
        raise ConfigError(f"invalid targets file {config_path}:\n" + "\n".join(lines)) from None
    if broken and not isolate_targets:
        raise ConfigError(f"invalid targets file {config_path}:\n" + "\n".join(broken.values()))
    return config
