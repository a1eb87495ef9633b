"""The per-area blocks of a target's settings: restore, migrations, PITR, encryption, offsite
copies, retention."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from backup_pipelines.engine.config.fields import (
    Compression,
    EnvVarName,
    StrictModel,
    absolute_key_path,
)


class DrillSettings(StrictModel):
    """How the restore drill of a target runs (key ``restore.drill:``)."""

    fresh_server: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Drill on a throwaway cluster initialised for the drill (initdb with the binaries of "
            "the backup's server major version, a free port, a temporary folder, always torn "
            "down): the backup set alone, globals included, must restore the database. true: "
            "always (the drill fails when those binaries are missing); false: in a scratch "
            "database on the drill server (scratch_dsn_env, else the target's own server); "
            "auto (default): fresh when the matching initdb is installed on this host and the "
            "target names no drill server (scratch_dsn_env)."
        ),
    )
    server_os_user: str = Field(
        default="postgres",
        description="OS user the throwaway cluster runs as when the drill runs as root.",
    )


class RestoreSettings(StrictModel):
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
    drill: DrillSettings = Field(
        default_factory=DrillSettings, description="How the restore drill runs (fresh_server)."
    )


SQL_IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class MigrationSettings(StrictModel):
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


WAL_S3_URL_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")


class PitrSettings(StrictModel):
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
    async_archive: bool = Field(
        default=False,
        description=(
            "Asynchronous archiving and recovery: a background worker pushes finished WAL "
            "(pg_wal/archive_status/*.ready) ahead of PostgreSQL's calls and prefetches segments "
            "ahead of recovery, so each wal-push / wal-fetch only checks a status file in "
            "spool_dir. wal-push still exits 0 only once the segment is stored in every place. "
            "Takes effect through the commands wal-setup prints (they gain --spool-dir)."
        ),
    )
    spool_dir: Path | None = Field(
        default=None,
        description=(
            "Folder of the async worker's status files and prefetched segments (owned by the "
            "server's OS user; wal-setup creates it). Required with async_archive; one per target."
        ),
    )
    async_workers: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Segments the async worker pushes or prefetches in parallel.",
    )
    prefetch_segments: int = Field(
        default=8,
        ge=0,
        le=1024,
        description=(
            "How many segments past the one recovery asks for the async worker fetches ahead "
            "(each takes 16 MiB in spool_dir until recovery uses it)."
        ),
    )
    archive_group: str | None = Field(
        default=None,
        description=(
            "OS group that may read the local WAL archive (e.g. the group of the `dagster` "
            "user that runs monitoring, restores and drills): archived files become 0640 and "
            "folders 2750 with this group, on every push. The server's OS user must be a "
            "member. Unset: files 0600, folders 0700 (only the server's OS user and root read)."
        ),
    )

    @field_validator("archive_group")
    @classmethod
    def _group_exists(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import grp

        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(
                f"archive_group: OS group {value!r} does not exist (create it: groupadd {value}; "
                "then add the server's OS user and the monitoring user to it with usermod -aG)"
            ) from None
        return value

    @property
    def archive_gid(self) -> int | None:
        """The gid of ``archive_group`` (None when the archive is private to its owner)."""
        if self.archive_group is None:
            return None
        import grp

        return grp.getgrnam(self.archive_group).gr_gid

    @field_validator("archive_dir", "drill_dir", "spool_dir")
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
        if self.async_archive and self.spool_dir is None:
            raise ValueError(
                "async_archive needs spool_dir (e.g. /var/spool/backup-pipelines/<target>)"
            )
        if (
            self.spool_dir is not None
            and self.archive_dir is not None
            and (self.spool_dir == self.archive_dir or self.archive_dir in self.spool_dir.parents)
        ):
            raise ValueError("spool_dir must not be inside archive_dir (it is no archived WAL)")
        return self


class PassphraseSource(StrictModel):
    """Where one passphrase comes from: an environment variable or a 0600 file (never the YAML)."""

    env: EnvVarName | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PassphraseSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        absolute_key_path(self.file)
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"


class EncryptionSettings(StrictModel):
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
        return absolute_key_path(value)

    @field_validator("public_key_files", "secret_key_files")
    @classmethod
    def _files(cls, value: list[Path]) -> list[Path]:
        return [p for p in (absolute_key_path(v) for v in value) if p is not None]

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


class LifecycleSettings(StrictModel):
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


class OffsiteSettings(StrictModel):
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
    concurrency: int = Field(
        default=6,
        ge=1,
        le=32,
        description="Parts sent or fetched at once per upload/download; each holds one part "
        "(8 MiB for files up to 78 GiB) in memory on uploads.",
    )
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


class RetentionSettings(StrictModel):
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
