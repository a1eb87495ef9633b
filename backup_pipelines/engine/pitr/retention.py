"""Retention for point-in-time recovery: base backups by the calendar policy (the same planner as
logical backups), and WAL only before the first segment the oldest kept base backup needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from backup_pipelines.engine.backup.base import BaseBackupMeta, list_base_backups
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
from backup_pipelines.engine.retention import (
    BASE_BACKUP_INTERVAL,
    RetentionPolicy,
    apply_retention,
    build_inventory,
    max_gap_for,
)
from backup_pipelines.engine.storage import list_stored_backups
from backup_pipelines.engine.wal import (
    WalArchive,
    parse_lsn,
    prune_wal,
    segment_number,
    wal_archive_for,
)


@dataclass
class PitrRetentionReport:
    kept: list[str]
    pruned: list[str]
    wal_removed: list[str]
    keep_wal_from: str | None
    held: str | None = None
    errors: list[str] = field(default_factory=list)
    # Set when "now" is implausible against the base backups: nothing (WAL included) was pruned.
    clock_problem: str | None = None


def apply_pitr_retention(
    config: ProjectConfig,
    target: Target,
    *,
    archive: WalArchive | None = None,
    remote_storage: Any = None,
    now: datetime | None = None,
    dry_run: bool = False,
    log: Any = None,
    progress: ProgressReporter | None = None,
) -> PitrRetentionReport:
    """Prune base backups with the target's calendar retention (the same planner as logical
    backups), then WAL older than the first segment the oldest *kept* base backup needs.

    WAL is never pruned when no base backup is kept, and nothing newer than that first segment
    is ever touched, so every kept base backup can still be recovered to any later moment.
    When the clock cannot be trusted (see ``engine.retention``) nothing is pruned at all.
    """
    archive = archive or wal_archive_for(target)
    now = now or datetime.now(UTC)
    local = [a for a, _ in list_base_backups(target)]
    remote = list_stored_backups(remote_storage) if remote_storage is not None else []
    remote = [a for a in remote if a.meta.kind == "base"]
    retention = target.settings.retention
    policy = RetentionPolicy(retention.daily, retention.weekly, retention.monthly)
    report = apply_retention(
        build_inventory(local, remote),
        policy,
        now=now,
        tz=config.timezone,
        remote_storage=remote_storage,
        dry_run=dry_run,
        max_gap=max_gap_for(BASE_BACKUP_INTERVAL),
        progress=reporter_for(progress, log),
        label=f"Pruning base backups of '{target.name}'",
    )
    kept = [e for e in report.entries if e.decision is not None and e.decision.keep]
    result = PitrRetentionReport(
        kept=[e.name for e in kept],
        pruned=[e.name for e in report.pruned],
        wal_removed=[],
        keep_wal_from=None,
        held=report.plan.hold_reason,
        errors=list(report.errors),
        clock_problem=report.plan.clock_problem,
    )
    if result.clock_problem is not None:
        return result
    kept_meta = []
    for entry in kept:
        artifact = entry.local or entry.remote
        if artifact is not None:
            kept_meta.append(BaseBackupMeta.model_validate(artifact.meta.model_dump()))
    if not kept_meta:
        return result
    oldest = min(kept_meta, key=lambda m: parse_lsn(m.start_lsn))
    result.keep_wal_from = oldest.first_wal_segment
    if not dry_run:
        result.wal_removed = prune_wal(
            archive,
            segment_number(oldest.first_wal_segment, oldest.wal_segment_size),
            oldest.wal_segment_size,
        )
    return result
