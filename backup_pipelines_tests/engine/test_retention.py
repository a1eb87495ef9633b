"""The retention planner (property-based, against an independent oracle) and applying its plan."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.retention import (
    BackupRecord,
    RetentionPolicy,
    apply_retention,
    build_inventory,
    cleanup_leftovers,
    plan_retention,
)
from backup_pipelines_tests.engine.storage_helpers import fake_backup

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Pacific/Chatham"]
NOW = datetime(2026, 3, 29, 12, 30, tzinfo=UTC)  # a DST change day in Europe


def _order(record: BackupRecord) -> tuple[datetime, str]:
    return (record.started_at, record.key)


def oracle_keep(
    records: list[BackupRecord], policy: RetentionPolicy, now: datetime, zone: str
) -> set[str]:
    """The expected kept set, written from the rules per backup instead of per period."""
    tz = ZoneInfo(zone)
    today = now.astimezone(tz).date()

    def eligible(r: BackupRecord) -> bool:
        return (
            r.status != "failed"
            and r.purpose not in ("pre-restore", "pre-rollback")
            and r.started_at <= now
        )

    def local_day(r: BackupRecord):
        return r.started_at.astimezone(tz).date()

    def in_window(r: BackupRecord, kind: str) -> bool:
        day = local_day(r)
        if kind == "daily":
            return 0 <= (today - day).days < policy.daily
        if kind == "weekly":
            monday_now = today - timedelta(days=today.weekday())
            monday = day - timedelta(days=day.weekday())
            return 0 <= (monday_now - monday).days // 7 < policy.weekly
        return 0 <= (today.year * 12 + today.month) - (day.year * 12 + day.month) < policy.monthly

    def same_period(a: BackupRecord, b: BackupRecord, kind: str) -> bool:
        da, db = local_day(a), local_day(b)
        if kind == "daily":
            return da == db
        if kind == "weekly":
            return da.isocalendar()[:2] == db.isocalendar()[:2]
        return (da.year, da.month) == (db.year, db.month)

    keep = set()
    for r in records:
        if r.started_at > now:
            keep.add(r.key)
            continue
        if (
            r.purpose in ("pre-restore", "pre-rollback")
            and 0 <= (today - local_day(r)).days < policy.daily
        ):
            keep.add(r.key)
        if not eligible(r):
            continue
        for kind in ("daily", "weekly", "monthly"):
            if in_window(r, kind) and not any(
                eligible(o) and same_period(o, r, kind) and _order(o) > _order(r) for o in records
            ):
                keep.add(r.key)
    verified = [r for r in records if r.status == "verified"]
    if verified:
        keep.add(max(verified, key=_order).key)
    return keep


records_strategy = st.lists(
    st.builds(
        lambda seconds, status, purpose: (seconds, status, purpose),
        st.integers(min_value=-2 * 86400, max_value=800 * 86400),
        st.sampled_from(["verified", "verified", "unverified", "failed"]),
        st.sampled_from(["scheduled", "scheduled", "manual", "pre-restore", "pre-rollback"]),
    ),
    max_size=60,
)
policy_strategy = st.builds(
    RetentionPolicy,
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 14),
)


def _records(raw: list[tuple[int, str, str]]) -> list[BackupRecord]:
    return [
        BackupRecord(f"b{i:03d}", NOW - timedelta(seconds=seconds), status, purpose)
        for i, (seconds, status, purpose) in enumerate(raw)
    ]


@settings(max_examples=300, deadline=None)
@given(raw=records_strategy, policy=policy_strategy, zone=st.sampled_from(ZONES))
def test_plan_keeps_exactly_the_expected_representatives(raw, policy, zone) -> None:
    records = _records(raw)
    plan = plan_retention(records, policy, NOW, zone)
    kept = {r.key for r in plan.keep}
    assert {d.record.key for d in plan.decisions} == {r.key for r in records}
    if not records:
        return
    newest = max(records, key=_order)
    if newest.status == "failed":
        assert plan.held and plan.prune == []
        return
    assert not plan.held
    assert kept == oracle_keep(records, policy, NOW, zone)
    counts = {
        kind: sum(kind in d.classes for d in plan.decisions)
        for kind in ("daily", "weekly", "monthly")
    }
    assert counts["daily"] <= policy.daily
    assert counts["weekly"] <= policy.weekly
    assert counts["monthly"] <= policy.monthly


@settings(max_examples=200, deadline=None)
@given(
    raw=records_strategy, policy=policy_strategy, zone=st.sampled_from(ZONES), seed=st.integers()
)
def test_plan_always_keeps_newest_verified_and_ignores_input_order(raw, policy, zone, seed) -> None:
    records = _records(raw)
    plan = plan_retention(records, policy, NOW, zone)
    verified = [r for r in records if r.status == "verified"]
    if verified:
        assert max(verified, key=_order) in plan.keep
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    again = plan_retention(shuffled, policy, NOW, zone)
    assert {r.key for r in again.keep} == {r.key for r in plan.keep}


def test_thirty_nightly_backups_with_the_default_policy() -> None:
    records = [
        BackupRecord(f"n{i:02d}", NOW.replace(hour=2) - timedelta(days=i)) for i in range(400)
    ]
    plan = plan_retention(records, RetentionPolicy(), NOW, "UTC")
    kept = {r.key for r in plan.keep}
    # NOW is Sunday 2026-03-29. Dailies: Mar 23..29. Weeklies: the Sundays closing the three
    # previous ISO weeks (Mar 22, 15, 8). Monthlies: the last day of each of the 11 previous
    # months (Feb 28 back to Apr 30, 2025); this week's and month's newest is today's daily.
    month_ends = [datetime(2026, 3, 1) - timedelta(days=1)]
    for _ in range(10):
        month_ends.append(month_ends[-1].replace(day=1) - timedelta(days=1))
    expected_days = [NOW.date() - timedelta(days=i) for i in (*range(7), 7, 14, 21)]
    expected_days += [d.date() for d in month_ends]
    expected = {f"n{(NOW.date() - day).days:02d}" for day in expected_days}
    assert len(expected) == 21
    assert kept == expected
    assert plan.decision("n00").classes == ("daily", "weekly", "monthly")
    assert "n399" not in kept


def test_newest_failed_holds_everything_and_names_the_reason() -> None:
    records = [
        BackupRecord("old", NOW - timedelta(days=90)),
        BackupRecord("new", NOW - timedelta(hours=1), status="failed"),
    ]
    plan = plan_retention(records, RetentionPolicy(daily=1, weekly=0, monthly=0), NOW)
    assert plan.held and "new" in (plan.hold_reason or "") and plan.prune == []


def test_apply_removes_pruned_backups_with_sidecars_and_keeps_partials(tmp_path: Path) -> None:
    folder = tmp_path / "prod"
    made = [
        fake_backup(folder, "shop", started_at=NOW - timedelta(days=d, hours=h))
        for d in range(0, 60, 3)
        for h in (0, 5)
    ]
    (folder / "shop_crashed.sql.gz.partial").write_bytes(b"half")
    entries = build_inventory(list_artifacts(folder), [])
    dry = apply_retention(
        entries, RetentionPolicy(daily=3, weekly=2, monthly=1), now=NOW, tz="UTC", dry_run=True
    )
    assert len(list(folder.iterdir())) == 3 * len(made) + 1
    assert dry.pruned
    entries = build_inventory(list_artifacts(folder), [])
    report = apply_retention(
        entries, RetentionPolicy(daily=3, weekly=2, monthly=1), now=NOW, tz="UTC"
    )
    kept_names = {e.name for e in report.entries if e.decision and e.decision.keep}
    assert {a.path.name for a in list_artifacts(folder)} == kept_names
    assert {e.name for e in report.pruned} == {e.name for e in dry.pruned}
    for entry in report.pruned:
        assert not any(p.name.startswith(entry.name) for p in folder.iterdir())
    # The leftover of a crashed run is not a backup: retention leaves it to the age-based cleanup.
    assert (folder / "shop_crashed.sql.gz.partial").exists()


def test_cleanup_leftovers_is_age_based(tmp_path: Path) -> None:
    folder = tmp_path / "prod"
    backup = fake_backup(folder, "shop")
    old_partial = folder / "shop_a.sql.gz.partial"
    young_partial = folder / "shop_b.sql.gz.partial"
    orphan_meta = folder / "shop_c.sql.gz.meta"
    for path in (old_partial, young_partial, orphan_meta):
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    for path in (old_partial, orphan_meta, backup.path, backup.meta_path):
        os.utime(path, (two_days_ago, two_days_ago))
    removed = cleanup_leftovers(folder, 24)
    assert sorted(removed) == sorted([old_partial, orphan_meta])
    assert young_partial.exists() and backup.path.exists() and backup.meta_path.exists()
