"""Calendar (grandfather-father-son) retention: a pure planner, and applying its plan.

:func:`plan_retention` decides from the times recorded in ``.meta`` (never file names or mtimes,
WAL-G #636) which backups to keep:

- **daily**: the newest usable backup of each of the last ``daily`` calendar days (today counts),
- **weekly**: the newest usable backup of each of the last ``weekly`` ISO weeks,
- **monthly**: the newest usable backup of each of the last ``monthly`` calendar months,

with days, weeks and months taken in the project's timezone. "Usable" means not failed
verification (verified or not yet verified). On top of that:

- the newest backup that passed verification is always kept;
- when the newest backup *failed* verification, nothing is deleted at all (something is wrong;
  the old backups may be all there is);
- safety backups (``purpose`` ``pre-restore`` / ``pre-rollback``, taken automatically before a
  restore or a migration rollback) never stand in for a day, week or month, so they cannot
  displace the scheduled backup of that period; each is kept while it is inside the daily
  window (``daily`` days), then pruned like any other backup;
- backups recorded in the future (clock skew) are kept.

Everything else is pruned. :func:`apply_retention` applies one plan to the local folder and to
the offsite copies alike, deleting each pruned backup's data file first and then its
``.sha256`` and ``.meta``. ``.partial`` leftovers of crashed runs are not backups and are left to
:func:`cleanup_leftovers`, which removes them (and orphaned sidecars) by age only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    list_artifacts,
)
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX
from backup_pipelines.engine.storage import BackupStorage, list_stored_backups

SAFETY_PURPOSES = frozenset({"pre-restore", "pre-rollback"})
CLASS_ORDER = ("daily", "weekly", "monthly")


@dataclass(frozen=True)
class RetentionPolicy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 12


@dataclass(frozen=True)
class BackupRecord:
    """What the planner needs to know about one backup (from its ``.meta``)."""

    key: str
    started_at: datetime
    status: str = "verified"  # verified, unverified or failed
    purpose: str = "scheduled"

    @property
    def usable(self) -> bool:
        return self.status != "failed"

    @property
    def is_safety(self) -> bool:
        return self.purpose in SAFETY_PURPOSES


@dataclass(frozen=True)
class Decision:
    record: BackupRecord
    keep: bool
    classes: tuple[str, ...]  # daily / weekly / monthly periods this backup represents
    reasons: tuple[str, ...]

    @property
    def retention_class(self) -> str:
        """The longest-lived class (monthly > weekly > daily), or a reason word when none."""
        for name in reversed(CLASS_ORDER):
            if name in self.classes:
                return name
        if not self.keep:
            return "pruned"
        words = [reason.split(":")[0] for reason in self.reasons]
        for word in ("safety", "newest-verified", "future", "hold"):
            if word in words:
                return word
        return "kept"


@dataclass(frozen=True)
class RetentionPlan:
    decisions: tuple[Decision, ...]
    held: bool = False  # nothing is deleted: the newest backup failed verification
    hold_reason: str | None = None

    @property
    def keep(self) -> list[BackupRecord]:
        return [d.record for d in self.decisions if d.keep]

    @property
    def prune(self) -> list[BackupRecord]:
        return [d.record for d in self.decisions if not d.keep]

    def decision(self, key: str) -> Decision:
        return next(d for d in self.decisions if d.record.key == key)


def day_of(moment: datetime, tz: ZoneInfo) -> date:
    return moment.astimezone(tz).date()


def week_of(day: date) -> tuple[int, int]:
    iso = day.isocalendar()
    return (iso.year, iso.week)


def month_of(day: date) -> tuple[int, int]:
    return (day.year, day.month)


def _recent_periods(today: date, daily: int, weekly: int, monthly: int) -> dict[str, set]:
    days = {today - timedelta(days=i) for i in range(daily)}
    weeks = {week_of(today - timedelta(weeks=i)) for i in range(weekly)}
    months: set[tuple[int, int]] = set()
    year, month = today.year, today.month
    for _ in range(monthly):
        months.add((year, month))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return {"daily": days, "weekly": weeks, "monthly": months}


def plan_retention(
    backups: Iterable[BackupRecord],
    policy: RetentionPolicy,
    now: datetime,
    tz: ZoneInfo | str = "UTC",
) -> RetentionPlan:
    """Decide which backups to keep. Pure: same input, same plan; nothing is touched."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    records = sorted(backups, key=lambda r: (r.started_at, r.key), reverse=True)
    if not records:
        return RetentionPlan(())
    today = day_of(now, zone)
    periods = _recent_periods(today, policy.daily, policy.weekly, policy.monthly)
    period_of = {
        "daily": lambda d: d,
        "weekly": week_of,
        "monthly": month_of,
    }
    classes: dict[str, list[str]] = {r.key: [] for r in records}
    reasons: dict[str, list[str]] = {r.key: [] for r in records}
    taken: dict[str, set] = {name: set() for name in CLASS_ORDER}
    for record in records:  # newest first: the first usable one of a period represents it
        if not record.usable or record.is_safety or record.started_at > now:
            continue
        day = day_of(record.started_at, zone)
        for name in CLASS_ORDER:
            period = period_of[name](day)
            if period in periods[name] and period not in taken[name]:
                taken[name].add(period)
                classes[record.key].append(name)
                reasons[record.key].append(f"{name}: newest of {_label(name, period)}")
    newest_verified = next((r for r in records if r.status == "verified"), None)
    if newest_verified is not None:
        reasons[newest_verified.key].append(
            "newest-verified: the newest backup that passed verification"
        )
    for record in records:
        if record.started_at > now:
            reasons[record.key].append("future: recorded after now (clock skew?)")
        elif record.is_safety and day_of(record.started_at, zone) in periods["daily"]:
            reasons[record.key].append(f"safety: {record.purpose} backup inside the daily window")
    held = records[0].status == "failed"
    hold_reason = (
        f"the newest backup {records[0].key} failed verification: nothing is deleted until a "
        "newer backup passes"
        if held
        else None
    )
    decisions = []
    for record in records:
        keep = held or bool(reasons[record.key])
        why = reasons[record.key]
        if not why and held:
            why = ["hold: the newest backup failed verification"]
        decisions.append(Decision(record, keep, tuple(classes[record.key]), tuple(why)))
    return RetentionPlan(tuple(decisions), held, hold_reason)


def _label(name: str, period: object) -> str:
    if name == "daily":
        return str(period)
    if name == "weekly":
        year, week = period  # type: ignore[misc]
        return f"{year}-W{week:02d}"
    year, month = period  # type: ignore[misc]
    return f"{year}-{month:02d}"


def record_for(artifact: BackupArtifact) -> BackupRecord:
    return BackupRecord(
        key=artifact.path.name,
        started_at=artifact.meta.started_at,
        status=artifact.status,
        purpose=artifact.meta.purpose,
    )


# -- applying a plan ------------------------------------------------------------------------


@dataclass
class InventoryEntry:
    """One backup wherever it lives, with its retention decision."""

    name: str
    started_at: datetime
    status: str
    purpose: str
    size_bytes: int
    local: BackupArtifact | None = None
    remote: BackupArtifact | None = None
    decision: Decision | None = None
    deleted_from: list[str] = field(default_factory=list)

    @property
    def locations(self) -> str:
        return "+".join(
            name for name, present in (("local", self.local), ("s3", self.remote)) if present
        )


@dataclass
class RetentionReport:
    plan: RetentionPlan
    entries: list[InventoryEntry]
    dry_run: bool
    errors: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)

    @property
    def pruned(self) -> list[InventoryEntry]:
        return [e for e in self.entries if e.decision is not None and not e.decision.keep]


def build_inventory(
    local: Sequence[BackupArtifact], remote: Sequence[BackupArtifact]
) -> list[InventoryEntry]:
    """Merge local and offsite backups by file name; local metadata wins (it is verified there)."""
    entries: dict[str, InventoryEntry] = {}
    for artifact in remote:
        entries[artifact.path.name] = _entry(artifact, remote=artifact)
    for artifact in local:
        existing = entries.get(artifact.path.name)
        entry = _entry(artifact, local=artifact)
        if existing is not None:
            entry.remote = existing.remote
        entries[artifact.path.name] = entry
    return sorted(entries.values(), key=lambda e: e.started_at, reverse=True)


def _entry(
    artifact: BackupArtifact,
    local: BackupArtifact | None = None,
    remote: BackupArtifact | None = None,
) -> InventoryEntry:
    return InventoryEntry(
        name=artifact.path.name,
        started_at=artifact.meta.started_at,
        status=artifact.status,
        purpose=artifact.meta.purpose,
        size_bytes=artifact.meta.size_bytes,
        local=local,
        remote=remote,
    )


def apply_retention(
    entries: list[InventoryEntry],
    policy: RetentionPolicy,
    *,
    now: datetime,
    tz: ZoneInfo | str,
    remote_storage: BackupStorage | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Plan over every known backup and delete the pruned ones locally and offsite.

    Each pruned backup loses its data file first, then ``.sha256`` and ``.meta``: a crash in
    between leaves orphaned sidecars (removed later by :func:`cleanup_leftovers`), never a data
    file without its checksum.
    """
    records = [BackupRecord(e.name, e.started_at, e.status, e.purpose) for e in entries]
    plan = plan_retention(records, policy, now, tz)
    report = RetentionReport(plan, entries, dry_run)
    for entry in entries:
        entry.decision = plan.decision(entry.name)
        if entry.decision.keep or dry_run:
            continue
        if entry.local is not None:
            try:
                for path in (entry.local.path, *entry.local.sidecars):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                entry.deleted_from.append("local")
            except OSError as exc:
                report.errors.append(f"{entry.local.path}: {exc}")
        if entry.remote is not None and remote_storage is not None:
            name = getattr(entry.remote, "name", entry.name)
            try:
                for object_name in (name, name + SHA256_SUFFIX, name + META_SUFFIX):
                    remote_storage.delete(object_name)
                entry.deleted_from.append("s3")
            except Exception as exc:  # one failed delete must not stop the rest
                report.errors.append(f"{entry.remote.location}: {exc}")
    return report


def cleanup_leftovers(
    backup_dir: Path, max_age_hours: float, *, now: float | None = None, dry_run: bool = False
) -> list[Path]:
    """Remove ``.partial`` files and sidecars without a data file, older than ``max_age_hours``.

    Age comes from the file's mtime on purpose: a leftover has no trustworthy ``.meta``, and a
    running backup keeps touching its ``.partial`` file, so a young one is never removed.
    """
    if not backup_dir.is_dir():
        return []
    cutoff = (now if now is not None else time.time()) - max_age_hours * 3600
    removed = []
    for path in sorted(backup_dir.iterdir()):
        if not path.is_file():
            continue
        name = path.name
        orphan = False
        for suffix in (META_SUFFIX, SHA256_SUFFIX):
            if name.endswith(suffix) and not name.endswith(PARTIAL_SUFFIX):
                data = path.with_name(name[: -len(suffix)])
                orphan = not data.exists()
        if not (name.endswith(PARTIAL_SUFFIX) or orphan):
            continue
        try:
            if path.stat().st_mtime >= cutoff:
                continue
            if not dry_run:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def prune_target(
    target: Target,
    *,
    timezone: str = "UTC",
    storage: BackupStorage | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> RetentionReport:
    """Apply the target's retention to its local backups and (when given) its offsite copies.

    When the offsite listing fails, only the local backups are planned and pruned and the error
    is reported in ``report.errors``: an S3 outage must not stop local housekeeping.
    """
    settings = target.settings.retention
    policy = RetentionPolicy(settings.daily, settings.weekly, settings.monthly)
    moment = now or datetime.now(UTC)
    # Logical backups only: base backups (PITR) have their own retention tied to the WAL.
    local = [a for a in list_artifacts(target.backup_dir) if a.meta.kind == "logical"]
    remote: list[BackupArtifact] = []
    errors: list[str] = []
    usable_storage = storage
    if storage is not None:
        try:
            remote = [a for a in list_stored_backups(storage) if a.meta.kind == "logical"]
        except BackupPipelinesError as exc:
            errors.append(f"offsite copies not listed, so not pruned: {exc.message}")
            usable_storage = None
    entries = build_inventory(local, remote)
    report = apply_retention(
        entries, policy, now=moment, tz=timezone, remote_storage=usable_storage, dry_run=dry_run
    )
    report.errors[:0] = errors
    report.leftovers_removed = [
        str(p)
        for p in cleanup_leftovers(
            target.backup_dir,
            settings.partial_max_age_hours,
            now=moment.timestamp(),
            dry_run=dry_run,
        )
    ]
    return report
