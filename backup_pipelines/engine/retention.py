"""Calendar (grandfather-father-son) retention: a pure planner, and applying its plan.

:func:`plan_retention` decides from the times recorded in ``.meta`` (never file names or mtimes,
WAL-G #636) which backups to keep:

- **daily**: the newest usable backup of each of the last ``daily`` calendar days that have one,
- **weekly**: the newest usable backup of each of the last ``weekly`` ISO weeks that have one,
- **monthly**: the newest usable backup of each of the last ``monthly`` months that have one,

with days, weeks and months taken in the project's timezone. "Usable" means not failed
verification and not damaged (verified, or not verified yet). Periods are counted back from the
newest backup, not from the clock: a day without a backup (an outage) or a clock that jumps
forward never makes retention delete the backups that are still the last ``daily`` days, weeks
and months of history. On top of that:

- **floor**: the newest ``daily`` verified backups (safety backups aside) are always kept,
  however old they are; and the newest backup that passed verification is always kept;
- **hold**: when the newest backup failed verification or is damaged, nothing is deleted at all
  (something is wrong; the old backups may be all there is);
- **clock check**: nothing is deleted either when "now" is implausible against the backups:
  a backup is dated more than :data:`~backup_pipelines.engine.clock.FUTURE_TOLERANCE` in the
  future (the clock went back, or that backup was taken while it was fast), or the newest
  backup is older than ``max_gap`` (the clock jumped forward, or backups stopped). The plan
  then says why (:attr:`RetentionPlan.clock_problem`); callers refuse and alert;
- safety backups (``purpose`` ``pre-restore`` / ``pre-rollback``, taken automatically before a
  restore or a migration rollback) never stand in for a day, week or month, so they cannot
  displace the scheduled backup of that period; each is kept while it is inside the daily
  window (the last ``daily`` calendar days, or as far back as the daily backups kept reach),
  then pruned like any other backup;
- backups recorded in the future are kept and stand in for nothing.

Everything else is pruned. :func:`apply_retention` applies one plan to the local folder and to
the offsite copies alike, deleting each pruned backup's data file first and then its
``.sha256`` and ``.meta``. ``.partial`` leftovers of crashed runs are not backups and are left to
:func:`cleanup_leftovers`, which removes them (and orphaned sidecars) by age only. Data files
whose ``.meta`` is missing or unreadable are never listed here, so retention never deletes them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    UnreadableBackup,
    data_name_of_globals,
    list_artifacts,
    list_unreadable,
)
from backup_pipelines.engine.clock import is_future, utc_now
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import BackupPipelinesError, RefusedError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX
from backup_pipelines.engine.listing import human_duration
from backup_pipelines.engine.progress import Progress, ProgressReporter, reporter_for
from backup_pipelines.engine.storage import BackupStorage, list_stored_backups

SAFETY_PURPOSES = frozenset({"pre-restore", "pre-rollback"})
CLASS_ORDER = ("daily", "weekly", "monthly")
USABLE_STATUSES = frozenset({"verified", "unverified"})
# "now" may lie at most this many expected backup intervals after the newest backup before
# retention refuses to run (and never less than MIN_MAX_GAP).
MAX_GAP_INTERVALS = 3
MIN_MAX_GAP = timedelta(days=3)
# The interval assumed when a target has no max_age (backed up elsewhere, on no fixed cadence).
UNKNOWN_INTERVAL = timedelta(days=7)
# Base backups (PITR) are taken weekly by default.
BASE_BACKUP_INTERVAL = timedelta(days=7)


class RetentionRefusedError(RefusedError):
    """Retention refused to delete anything because the clock cannot be trusted."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"retention refused, nothing was deleted: {problem}",
            hint="check this host's clock (`timedatectl`, `chronyc tracking`) and that backups "
            "still run; retention deletes nothing until the clock and the backups' times agree",
        )


def max_gap_for(interval: timedelta | None) -> timedelta:
    """How long after the newest backup "now" may plausibly be, for backups expected every
    ``interval`` (a target's ``max_age``; None when off): three intervals, at least 3 days."""
    return max(MAX_GAP_INTERVALS * (interval or UNKNOWN_INTERVAL), MIN_MAX_GAP)


DEFAULT_MAX_GAP = max_gap_for(timedelta(hours=24))


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
    status: str = "verified"  # verified, unverified, failed or damaged
    purpose: str = "scheduled"

    @property
    def usable(self) -> bool:
        return self.status in USABLE_STATUSES

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
        for word in ("future", "safety", "newest-verified", "floor", "hold"):
            if word in words:
                return word
        return "kept"


@dataclass(frozen=True)
class RetentionPlan:
    decisions: tuple[Decision, ...]
    held: bool = False  # nothing is deleted (see hold_reason)
    hold_reason: str | None = None
    # Set when "now" is implausible against the backups: retention refuses to run at all.
    clock_problem: str | None = None

    @property
    def keep(self) -> list[BackupRecord]:
        return [d.record for d in self.decisions if d.keep]

    @property
    def prune(self) -> list[BackupRecord]:
        return [d.record for d in self.decisions if not d.keep]

    @property
    def future_dated(self) -> list[BackupRecord]:
        return [d.record for d in self.decisions if d.retention_class == "future"]

    def decision(self, key: str) -> Decision:
        return next(d for d in self.decisions if d.record.key == key)


def day_of(moment: datetime, tz: ZoneInfo) -> date:
    return moment.astimezone(tz).date()


def week_of(day: date) -> tuple[int, int]:
    iso = day.isocalendar()
    return (iso.year, iso.week)


def month_of(day: date) -> tuple[int, int]:
    return (day.year, day.month)


PERIOD_OF: dict[str, Callable[[date], object]] = {
    "daily": lambda d: d,
    "weekly": week_of,
    "monthly": month_of,
}


def clock_problem(records: Sequence[BackupRecord], now: datetime, max_gap: timedelta) -> str | None:
    """Why ``now`` cannot be trusted against these backups (None when it can)."""
    if not records:
        return None
    ahead = [r for r in records if is_future(r.started_at, now)]
    if ahead:
        newest = max(ahead, key=lambda r: r.started_at)
        return (
            f"{len(ahead)} backup(s) are dated in the future (newest {newest.key}, "
            f"{human_duration((newest.started_at - now).total_seconds())} ahead of this host's "
            f"clock, now {now.isoformat(timespec='seconds')}): either this clock went back or "
            "they were taken while it was fast; if the clock is right, move the future-dated "
            "backups out of the backup folder"
        )
    newest = max(records, key=lambda r: r.started_at)
    gap = now - newest.started_at
    if gap > max_gap:
        return (
            f"the newest backup {newest.key} is {human_duration(gap.total_seconds())} old, more "
            f"than the {human_duration(max_gap.total_seconds())} retention accepts (now "
            f"{now.isoformat(timespec='seconds')}): either this clock jumped forward or backups "
            "stopped"
        )
    return None


def plan_retention(
    backups: Iterable[BackupRecord],
    policy: RetentionPolicy,
    now: datetime,
    tz: ZoneInfo | str = "UTC",
    *,
    max_gap: timedelta = DEFAULT_MAX_GAP,
) -> RetentionPlan:
    """Decide which backups to keep. Pure: same input, same plan; nothing is touched."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    records = sorted(backups, key=lambda r: (r.started_at, r.key), reverse=True)
    if not records:
        return RetentionPlan(())
    future = {r.key for r in records if is_future(r.started_at, now)}
    candidates = [r for r in records if r.usable and not r.is_safety and r.key not in future]
    classes: dict[str, list[str]] = {r.key: [] for r in records}
    reasons: dict[str, list[str]] = {r.key: [] for r in records}
    daily_days: list[date] = []
    for name in CLASS_ORDER:
        limit = getattr(policy, name)
        taken: set[object] = set()
        # Newest first, so the first backup met in a period is its newest, and periods come in
        # order: the first ``limit`` distinct ones are the last periods that have a backup.
        for record in candidates:
            day = day_of(record.started_at, zone)
            period = PERIOD_OF[name](day)
            if period in taken:
                continue
            if len(taken) >= limit:
                break
            taken.add(period)
            classes[record.key].append(name)
            reasons[record.key].append(f"{name}: newest of {_label(name, period)}")
            if name == "daily":
                daily_days.append(day)
    verified = [r for r in candidates if r.status == "verified"]
    for record in verified[: policy.daily]:
        if not classes[record.key]:
            reasons[record.key].append(
                f"floor: one of the newest {policy.daily} verified backups, kept however old"
            )
    newest_verified = next((r for r in records if r.status == "verified"), None)
    if newest_verified is not None:
        reasons[newest_verified.key].append(
            "newest-verified: the newest backup that passed verification"
        )
    today = day_of(now, zone)
    oldest_daily = min(daily_days) if daily_days else None
    for record in records:
        if record.key in future:
            reasons[record.key].append("future: dated after now (clock skew?)")
        elif record.is_safety:
            day = day_of(record.started_at, zone)
            if (today - day).days < policy.daily or (
                oldest_daily is not None and day >= oldest_daily
            ):
                reasons[record.key].append(
                    f"safety: {record.purpose} backup inside the daily window"
                )
    problem = clock_problem(records, now, max_gap)
    if problem is not None:
        hold_reason: str | None = f"clock check: {problem}"
        hold_word = "hold: the clock cannot be trusted"
    elif not records[0].usable:
        verb = "is damaged" if records[0].status == "damaged" else "failed verification"
        hold_reason = (
            f"the newest backup {records[0].key} {verb}: nothing is deleted until a newer "
            "backup passes"
        )
        hold_word = f"hold: the newest backup {verb}"
    else:
        hold_reason = None
        hold_word = ""
    held = hold_reason is not None
    decisions = []
    for record in records:
        keep = held or bool(reasons[record.key])
        why = reasons[record.key]
        if not why and held:
            why = [hold_word]
        decisions.append(Decision(record, keep, tuple(classes[record.key]), tuple(why)))
    return RetentionPlan(tuple(decisions), held, hold_reason, problem)


def _label(name: str, period: object) -> str:
    if name == "daily":
        return str(period)
    if name == "weekly":
        year, week = cast(tuple[int, int], period)
        return f"{year}-W{week:02d}"
    year, month = cast(tuple[int, int], period)
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
    # Local data files whose .meta is missing or unreadable: never planned, never deleted.
    unreadable: list[UnreadableBackup] = field(default_factory=list)

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
    max_gap: timedelta = DEFAULT_MAX_GAP,
    progress: ProgressReporter | None = None,
    label: str = "Pruning",
) -> RetentionReport:
    """Plan over every known backup and delete the pruned ones locally and offsite.

    Each pruned backup loses its data file first, then ``.sha256`` and ``.meta``: a crash in
    between leaves orphaned sidecars (removed later by :func:`cleanup_leftovers`), never a data
    file without its checksum. With ``progress``, the backups deleted so far are reported
    (as ``label``).
    """
    records = [BackupRecord(e.name, e.started_at, e.status, e.purpose) for e in entries]
    plan = plan_retention(records, policy, now, tz, max_gap=max_gap)
    report = RetentionReport(plan, entries, dry_run)
    for entry in entries:
        entry.decision = plan.decision(entry.name)
    doomed = [] if dry_run else [e for e in entries if e.decision and not e.decision.keep]
    if progress is None or not doomed:
        _delete(doomed, remote_storage, report, None)
    else:
        with progress.start(label, len(doomed), "backups") as meter:
            _delete(doomed, remote_storage, report, meter)
    return report


def _delete(
    doomed: list[InventoryEntry],
    remote_storage: BackupStorage | None,
    report: RetentionReport,
    meter: Progress | None,
) -> None:
    """Delete each pruned backup locally and offsite; a failure is reported, not raised."""
    for entry in doomed:
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
            # The data object first, its .meta last: an interrupted delete never leaves a
            # listable backup without its data. The globals file goes with its backup.
            sidecars = getattr(entry.remote, "sidecar_names", None) or [
                name + SHA256_SUFFIX,
                name + META_SUFFIX,
            ]
            others = [n for n in sidecars if not n.endswith(META_SUFFIX)]
            metas = [n for n in sidecars if n.endswith(META_SUFFIX)]
            try:
                for object_name in (name, *others, *metas):
                    remote_storage.delete(object_name)
                entry.deleted_from.append("s3")
            except Exception as exc:  # one failed delete must not stop the rest
                report.errors.append(f"{entry.remote.location}: {exc}")
        if meter is not None:
            meter.advance(1)


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
        globals_of = data_name_of_globals(name)
        if globals_of is not None and not name.endswith(PARTIAL_SUFFIX):
            # A globals file (or its .sha256) whose backup never got its data file.
            orphan = not path.with_name(globals_of).exists()
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
    log: Any = None,
    progress: ProgressReporter | None = None,
) -> RetentionReport:
    """Apply the target's retention to its local backups and (when given) its offsite copies.
    The backups deleted so far go to ``progress`` (default: lines in ``log``).

    When the offsite listing fails, only the local backups are planned and pruned and the error
    is reported in ``report.errors`` (one line: what is wrong, what to do): an S3 outage or a
    host without AWS credentials must not stop local housekeeping. When the clock cannot be
    trusted (``report.plan.clock_problem``) nothing at all is deleted, leftovers included.
    """
    settings = target.settings.retention
    policy = RetentionPolicy(settings.daily, settings.weekly, settings.monthly)
    moment = now or utc_now()
    # Logical backups only: base backups (PITR) have their own retention tied to the WAL.
    local = [a for a in list_artifacts(target.backup_dir) if a.meta.kind == "logical"]
    remote: list[BackupArtifact] = []
    errors: list[str] = []
    usable_storage = storage
    if storage is not None:
        try:
            remote = [a for a in list_stored_backups(storage) if a.meta.kind == "logical"]
        except BackupPipelinesError as exc:
            hint = f" (what to do: {exc.hint})" if exc.hint else ""
            errors.append(
                f"offsite copies not listed, so not pruned (local retention ran): "
                f"{exc.message}{hint}"
            )
            usable_storage = None
    entries = build_inventory(local, remote)
    report = apply_retention(
        entries,
        policy,
        now=moment,
        tz=timezone,
        remote_storage=usable_storage,
        dry_run=dry_run,
        max_gap=max_gap_for(target.settings.max_age),
        progress=reporter_for(progress, log),
        label=f"Pruning '{target.name}'",
    )
    report.errors[:0] = errors
    report.unreadable = list_unreadable(target.backup_dir)
    if report.plan.clock_problem is not None:
        return report
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
