"""The health of a target's WAL archive right now (the wal_archive sensor and check, and
``wal-status``): newest segment and its age, gaps, archiver failures, segments waiting."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.pitr.window import usable_base_backups
from backup_pipelines.engine.postgres import connect
from backup_pipelines.engine.wal import (
    DEFAULT_SEGMENT_SIZE,
    WalArchive,
    WalGap,
    find_gaps,
    list_wal,
    newest_segment,
    parse_lsn,
    pitr_settings,
    segment_number,
    wal_archive_for,
)


@dataclass
class ArchiveHealth:
    """What monitoring needs to know about a target's WAL archive right now."""

    target: str
    problems: list[str]
    archive: str
    segments: int = 0
    newest_segment: str | None = None
    newest_archived_at: datetime | None = None
    age_seconds: float | None = None
    lag_limit_seconds: float = 0.0
    first_needed_segment: str | None = None
    gaps: list[WalGap] = field(default_factory=list)
    unarchived_segments: int | None = None
    archiver: dict[str, Any] = field(default_factory=dict)
    server_error: str | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.healthy:
            age = f"{self.age_seconds:.0f}s" if self.age_seconds is not None else "?"
            return (
                f"WAL archive of '{self.target}' healthy: {self.segments} segments, newest "
                f"{self.newest_segment} archived {age} ago, no gaps since {self.first_needed_segment}"
            )
        return f"WAL archive of '{self.target}' UNHEALTHY: " + "; ".join(self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "healthy": self.healthy,
            "problems": self.problems,
            "archive": self.archive,
            "segments": self.segments,
            "newest_segment": self.newest_segment,
            "newest_archived_at": self.newest_archived_at.isoformat()
            if self.newest_archived_at
            else None,
            "age_seconds": self.age_seconds,
            "lag_limit_seconds": self.lag_limit_seconds,
            "first_needed_segment": self.first_needed_segment,
            "gaps": [g.__dict__ for g in self.gaps],
            "unarchived_segments": self.unarchived_segments,
            "archiver": self.archiver,
            "server_error": self.server_error,
        }


def _archiver_stats(info: ConnectionInfo, segment_size: int) -> tuple[dict[str, Any], int | None]:
    info = ConnectionInfo({**info.params, "connect_timeout": "5"})
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
            "last_failed_wal, last_failed_time FROM pg_stat_archiver"
        )
        row = cur.fetchone()
        assert row is not None
        stats = dict(
            zip(
                ("archived_count", "last_archived_wal", "last_archived_time", "failed_count",
                 "last_failed_wal", "last_failed_time"),
                row,
                strict=True,
            )
        )  # fmt: skip
        cur.execute("SELECT pg_is_in_recovery()")
        in_recovery = bool(cur.fetchone()[0])  # type: ignore[index]
        current_segno = None
        if not in_recovery:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            current_segno = parse_lsn(str(cur.fetchone()[0])) // segment_size  # type: ignore[index]
    return stats, current_segno


def archive_health(
    target: Target, *, archive: WalArchive | None = None, now: datetime | None = None
) -> ArchiveHealth:
    settings = pitr_settings(target)
    archive = archive or wal_archive_for(target)
    now = now or datetime.now(UTC)
    health = ArchiveHealth(
        target.name,
        [],
        archive.describe(),
        lag_limit_seconds=settings.archive_lag_limit_minutes * 60,
    )
    try:
        entries = list_wal(archive)
    except BackupPipelinesError as exc:
        health.problems.append(f"the WAL archive cannot be listed: {exc.message}")
        return health
    backups = usable_base_backups(target)
    oldest = backups[-1][1] if backups else None
    segment_size = oldest.wal_segment_size if oldest else DEFAULT_SEGMENT_SIZE
    segments = [e for e in entries if e.kind == "segment"]
    health.segments = len(segments)
    newest = newest_segment(entries)
    if newest is not None:
        health.newest_segment = newest.name
        health.newest_archived_at = newest.archived_at
        if newest.archived_at is not None:
            health.age_seconds = round((now - newest.archived_at).total_seconds(), 1)
    start = None
    if oldest is not None:
        health.first_needed_segment = oldest.first_wal_segment
        start = segment_number(oldest.first_wal_segment, segment_size)
    elif segments:
        health.first_needed_segment = min(segments, key=lambda e: e.name).name
    health.gaps = find_gaps(entries, start, segment_size)
    for gap in health.gaps:
        health.problems.append(
            f"gap in the WAL archive: {gap.count} segment(s) {gap.first_missing}..{gap.last_missing} "
            "missing (point-in-time recovery cannot pass them; take a new base backup)"
        )
    try:
        stats, current_segno = _archiver_stats(
            ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}'"), segment_size
        )
        health.archiver = {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in stats.items()
        }
        failed_at, archived_at = stats["last_failed_time"], stats["last_archived_time"]
        if failed_at is not None and (archived_at is None or failed_at > archived_at):
            health.problems.append(
                f"archive_command is failing: {stats['last_failed_wal']} failed at "
                f"{failed_at.isoformat()} ({stats['failed_count']} failures since the statistics "
                "reset); see the server log for wal-push's message"
            )
        if current_segno is not None and newest is not None:
            health.unarchived_segments = max(
                current_segno - segment_number(newest.name[:24], segment_size) - 1, 0
            )
    except BackupPipelinesError as exc:
        health.server_error = exc.message
    if newest is None:
        health.problems.append(
            "nothing archived yet: check archive_mode/archive_command (`backup-pipelines wal-setup`)"
        )
    elif health.age_seconds is not None and health.age_seconds > health.lag_limit_seconds:
        waiting = health.unarchived_segments
        if waiting is None or waiting > 0:
            health.problems.append(
                f"archive lag: the newest archived segment {newest.name} is "
                f"{health.age_seconds / 60:.1f} min old (limit {settings.archive_lag_limit_minutes:g} min)"
                + (f" and {waiting} finished segment(s) wait to be archived" if waiting else "")
                + (f"; server not reachable: {health.server_error}" if health.server_error else "")
            )
    return health
