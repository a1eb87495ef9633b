"""What a target's backups look like to an operator: newest first, size, age, status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from backup_pipelines.engine.artifacts import BackupArtifact, list_artifacts, list_partials
from backup_pipelines.engine.config import Target


@dataclass(frozen=True)
class BackupListing:
    artifacts: list[BackupArtifact]
    partial_leftovers: int


def list_backups(target: Target) -> BackupListing:
    return BackupListing(list_artifacts(target.backup_dir), len(list_partials(target.backup_dir)))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_age(moment: datetime, now: datetime | None = None) -> str:
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"
