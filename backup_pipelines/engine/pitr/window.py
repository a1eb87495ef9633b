"""What can be recovered: the window from the oldest usable base backup to the newest archived
WAL, the moment an operator asks for, and the base backup that recovers to it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.base import BaseBackupMeta, list_base_backups
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import ConfigError, RefusedError, RestoreFailedError
from backup_pipelines.engine.wal import WalArchive, list_wal, newest_segment


class PitrRangeError(RestoreFailedError, RefusedError):
    """The requested moment cannot be recovered to with the backups and WAL at hand."""


@dataclass(frozen=True)
class RecoveryWindow:
    earliest: datetime | None
    latest: datetime | None
    newest_segment: str | None

    def describe(self, tz: str = "UTC") -> str:
        if self.earliest is None:
            return "nothing (no base backup yet: take one with `backup-pipelines base-backup <target>`)"
        if self.latest is None:
            return "nothing (no WAL archived yet: check archive_command and pg_stat_archiver)"
        zone = ZoneInfo(tz)
        return (
            f"{self.earliest.astimezone(zone).isoformat(sep=' ', timespec='seconds')} .. "
            f"{self.latest.astimezone(zone).isoformat(sep=' ', timespec='seconds')}"
        )


def usable_base_backups(target: Target) -> list[tuple[BackupArtifact, BaseBackupMeta]]:
    return [(a, m) for a, m in list_base_backups(target) if a.usable]


def recovery_window(target: Target, archive: WalArchive) -> RecoveryWindow:
    """From the end of the oldest usable base backup to the newest archived WAL."""
    backups = usable_base_backups(target)
    earliest = min((m.consistent_at for _, m in backups), default=None)
    newest = newest_segment(list_wal(archive))
    latest = None
    if newest is not None:
        record = archive.primary.read_record(newest.name)
        # The segment file's own mtime is when the server last wrote into it; later commits
        # are in a segment that is not archived yet.
        latest = (record.source_mtime or record.archived_at) if record else newest.archived_at
    return RecoveryWindow(earliest, latest, newest.name if newest else None)


def parse_target_time(text: str, timezone: str = "UTC") -> datetime:
    """``2026-11-24 15:30:00`` (in the targets file's timezone), or ISO 8601 with an offset."""
    cleaned = text.strip().replace("T", " ")
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ConfigError(
            f"--to {text!r} is not a timestamp",
            hint="use e.g. '2026-11-24 15:30:00' (targets-file timezone) or '2026-11-24T15:30:00+01:00'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment.astimezone(UTC)


def choose_base_backup(
    target: Target, archive: WalArchive, to: datetime, timezone: str = "UTC"
) -> tuple[BackupArtifact, BaseBackupMeta]:
    """The newest usable base backup that was consistent before ``to``; refuses moments outside
    the recoverable window, naming the window."""
    window = recovery_window(target, archive)
    wanted = to.astimezone(ZoneInfo(timezone)).isoformat(sep=" ", timespec="seconds")
    if (
        window.earliest is None
        or window.latest is None
        or not (window.earliest <= to <= window.latest)
    ):
        raise PitrRangeError(
            f"cannot recover target '{target.name}' to {wanted}: the recoverable range is "
            f"{window.describe(timezone)}",
            hint="pick a time inside that range (it starts when the oldest base backup finished "
            "and ends with the newest archived WAL segment)",
        )
    candidates = [(a, m) for a, m in usable_base_backups(target) if m.consistent_at <= to]
    artifact, meta = max(candidates, key=lambda pair: pair[1].consistent_at)
    return artifact, meta
