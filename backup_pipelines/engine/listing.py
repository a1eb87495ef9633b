"""What a target's backups look like to an operator, and which one is "the newest".

:func:`newest_backup` is the only place that decides which backup is the newest: ``restore
latest``, drills, ``check-freshness``, the stale-backup sensor and the metrics all ask it. A
backup dated in the future (see :func:`~backup_pipelines.engine.clock.is_future`) is never the
newest: it was taken while the clock was fast, and trusting it would hide that no fresh backup
has been taken since.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from backup_pipelines.engine.artifacts import (
    BackupArtifact,
    UnreadableBackup,
    list_artifacts,
    list_partials,
    list_unreadable,
)
from backup_pipelines.engine.clock import FUTURE_TOLERANCE, is_future, utc_now
from backup_pipelines.engine.config import Target


def newest_backup(
    artifacts: Iterable[BackupArtifact],
    *,
    now: datetime | None = None,
    usable_only: bool = True,
    skip_purposes: Collection[str] = (),
) -> BackupArtifact | None:
    """The newest backup by its recorded start time, never one dated in the future.

    ``usable_only`` (the default) skips backups that failed verification or are damaged;
    ``skip_purposes`` skips backups taken for those purposes (e.g. ``pre-restore``)."""
    moment = now or utc_now()
    candidates = [
        a
        for a in artifacts
        if not is_future(a.meta.started_at, moment)
        and (a.usable or not usable_only)
        and a.meta.purpose not in skip_purposes
    ]
    return max(candidates, key=lambda a: (a.meta.started_at, a.path.name), default=None)


def future_dated(
    artifacts: Iterable[BackupArtifact], now: datetime | None = None
) -> list[BackupArtifact]:
    """Backups dated in the future (taken while the clock was fast), newest first."""
    moment = now or utc_now()
    return [a for a in artifacts if is_future(a.meta.started_at, moment)]


def future_note(artifact: BackupArtifact, now: datetime | None = None) -> str:
    """One line for an operator about a backup dated in the future."""
    moment = now or utc_now()
    ahead = human_duration((artifact.meta.started_at - moment).total_seconds())
    return (
        f"dated {ahead} in the future (taken while the clock was fast?): never used as the "
        "newest backup, and retention is on hold while it exists"
    )


def problem_of(artifact: BackupArtifact) -> str | None:
    """Why a backup is not usable: the failed check's message, or the damage found."""
    if artifact.status == "failed":
        checks = (artifact.meta.verification or {}).get("checks") or {}
        failed = [f"{n}: {c.get('message', '')}" for n, c in checks.items() if not c.get("passed")]
        return "verification failed - " + ("; ".join(failed) or "no details recorded")
    return artifact.damage


@dataclass(frozen=True)
class BackupListing:
    artifacts: list[BackupArtifact]
    partial_leftovers: int
    unreadable: list[UnreadableBackup] = field(default_factory=list)
    now: datetime = field(default_factory=utc_now)

    @property
    def newest(self) -> BackupArtifact | None:
        """What ``restore latest`` and the freshness checks treat as the newest backup."""
        return newest_backup(self.artifacts, now=self.now)


def list_backups(target: Target, now: datetime | None = None) -> BackupListing:
    """Every backup in the target's folder: complete ones, and data files whose ``.meta`` is
    missing or unreadable (never hidden)."""
    folder = target.backup_dir
    return BackupListing(
        list_artifacts(folder),
        len(list_partials(folder)),
        list_unreadable(folder),
        now or utc_now(),
    )


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_duration(seconds: float) -> str:
    """``42m``, ``3h05m``, ``12d04h`` (never negative: pass a length of time)."""
    seconds = int(max(seconds, 0))
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def human_age(moment: datetime, now: datetime | None = None) -> str:
    """How long ago ``moment`` was; ``future`` for a moment beyond the clock tolerance (an age
    is never printed negative)."""
    seconds = ((now or utc_now()) - moment).total_seconds()
    if seconds < -FUTURE_TOLERANCE.total_seconds():
        return "future"
    return human_duration(seconds)
