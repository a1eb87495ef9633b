"""The retention planner (property-based, against an independent oracle) and applying its plan."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.clock import FUTURE_TOLERANCE
from backup_pipelines.engine.retention import (
    DEFAULT_MAX_GAP,
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


def oracle_plan(
    records: list[BackupRecord],
    policy: RetentionPolicy,
    now: datetime,
    zone: str,
    max_gap: timedelta = DEFAULT_MAX_GAP,
) -> tuple[bool, set[str]]:
    """(held, kept keys), written from the rules per backup instead of per period."""
    tz = ZoneInfo(zone)
    today = now.astimezone(tz).date()
    everything = {r.key for r in records}
    if not records:
        return False, set()

    def future(r: BackupRecord) -> bool:
        return r.started_at > now + FUTURE_TOLERANCE

    newest = max(records, key=_order)
    if any(future(r) for r in records) or now - newest.started_at > max_gap:
        return True, everything  # the clock cannot be trusted: nothing is deleted
    if newest.status not in ("verified", "unverified"):
        return True, everything  # the newest backup is bad: nothing is deleted

    def eligible(r: BackupRecord) -> bool:
        return (
            r.status in ("verified", "unverified")
            and r.purpose not in ("pre-restore", "pre-rollback")
            and not future(r)
        )

    def local_day(r: BackupRecord):
        return r.started_at.astimezone(tz).date()

    def period(r: BackupRecord, kind: str) -> object:
        day = local_day(r)
        if kind == "daily":
            return day
        if kind == "weekly":
            return day.isocalendar()[:2]
        return (day.year, day.month)

    limits = {"daily": policy.daily, "weekly": policy.weekly, "monthly": policy.monthly}
    keep = set()
    daily_reps = []
    for kind, limit in limits.items():
        # The last `limit` periods that have an eligible backup, counted from the newest one.
        recent = sorted({period(o, kind) for o in records if eligible(o)}, reverse=True)[:limit]
        for r in records:
            if (
                eligible(r)
                and period(r, kind) in recent
                and not any(
                    eligible(o) and period(o, kind) == period(r, kind) and _order(o) > _order(r)
                    for o in records
                )
            ):
                keep.add(r.key)
                if kind == "daily":
                    daily_reps.append(r)
    verified = sorted(
        (r for r in records if eligible(r) and r.status == "verified"), key=_order, reverse=True
    )
    keep.update(r.key for r in verified[: policy.daily])  # the floor
    any_verified = [r for r in records if r.status == "verified"]
    if any_verified:
        keep.add(max(any_verified, key=_order).key)
    oldest_daily = min((local_day(r) for r in daily_reps), default=None)
    for r in records:
        if r.purpose in ("pre-restore", "pre-rollback") and (
            (today - local_day(r)).days < policy.daily
            or (oldest_daily is not None and local_day(r) >= oldest_daily)
        ):
            keep.add(r.key)
    return False, keep


STATUSES = ["verified", "verified", "unverified", "failed", "damaged"]
PURPOSES = ["scheduled", "scheduled", "manual", "pre-restore", "pre-rollback"]
records_strategy = st.lists(
    st.builds(
        lambda seconds, status, purpose: (seconds, status, purpose),
        st.integers(min_value=-2 * 86400, max_value=800 * 86400),
        st.sampled_from(STATUSES),
        st.sampled_from(PURPOSES),
    ),
    max_size=60,
)
# Histories as the tool leaves them: nothing dated after "now".
past_records_strategy = st.lists(
    st.builds(
        lambda seconds, status, purpose: (seconds, status, purpose),
        st.integers(min_value=0, max_value=400 * 86400),
        st.sampled_from(STATUSES),
        st.sampled_from(PURPOSES),
    ),
    min_size=1,
    max_size=60,
)
policy_strategy = st.builds(
    RetentionPolicy,
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 14),
)
gap_strategy = st.sampled_from([DEFAULT_MAX_GAP, timedelta(days=30), timedelta(days=2000)])


def _records(raw: list[tuple[int, str, str]]) -> list[BackupRecord]:
    return [
        BackupRecord(f"b{i:03d}", NOW - timedelta(seconds=seconds), status, purpose)
        for i, (seconds, status, purpose) in enumerate(raw)
    ]


def _non_safety(keys: set[str], records: list[BackupRecord]) -> set[str]:
    safety = {r.key for r in records if r.is_safety}
    return keys - safety


@settings(max_examples=400, deadline=None)
@given(
    raw=records_strategy,
    policy=policy_strategy,
    zone=st.sampled_from(ZONES),
    max_gap=gap_strategy,
)
def test_plan_keeps_exactly_the_expected_representatives(raw, policy, zone, max_gap) -> None:
    records = _records(raw)
    plan = plan_retention(records, policy, NOW, zone, max_gap=max_gap)
    kept = {r.key for r in plan.keep}
    assert {d.record.key for d in plan.decisions} == {r.key for r in records}
    held, expected = oracle_plan(records, policy, NOW, zone, max_gap)
    assert plan.held == held
    assert kept == expected
    if held:
        assert plan.prune == [] and plan.hold_reason
        return
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


@settings(max_examples=300, deadline=None)
@given(
    raw=records_strategy,
    policy=policy_strategy,
    zone=st.sampled_from(ZONES),
    jump_days=st.floats(min_value=-800, max_value=800),
)
def test_never_fewer_than_daily_verified_backups_whatever_the_clock(
    raw, policy, zone, jump_days
) -> None:
    records = _records(raw)
    now = NOW + timedelta(days=jump_days)
    plan = plan_retention(records, policy, now, zone, max_gap=timedelta(days=2000))
    verified = [r for r in records if r.status == "verified" and not r.is_safety]
    kept_verified = [r for r in plan.keep if r.status == "verified" and not r.is_safety]
    assert len(kept_verified) >= min(policy.daily, len(verified))


@settings(max_examples=300, deadline=None)
@given(
    raw=past_records_strategy,
    policy=policy_strategy,
    zone=st.sampled_from(ZONES),
    jump=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=800)),
)
def test_a_forward_clock_jump_refuses_or_keeps_everything_the_right_clock_keeps(
    raw, policy, zone, jump
) -> None:
    records = _records(raw)
    now = max(r.started_at for r in records) + timedelta(hours=1)  # the right clock
    right = plan_retention(records, policy, now, zone)
    assume(not right.held)
    wrong = plan_retention(records, policy, now + jump, zone)
    if wrong.clock_problem is not None:
        assert wrong.held and wrong.prune == []
        assert jump > DEFAULT_MAX_GAP - timedelta(hours=1)
        return
    # Only safety backups (kept for `daily` days) age with the clock; no other backup the right
    # clock keeps is ever lost to a jump.
    right_kept = _non_safety({r.key for r in right.keep}, records)
    assert right_kept <= {r.key for r in wrong.keep}


@settings(max_examples=300, deadline=None)
@given(
    raw=past_records_strategy,
    policy=policy_strategy,
    zone=st.sampled_from(ZONES),
    back=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=800)),
)
def test_a_backward_clock_jump_deletes_nothing(raw, policy, zone, back) -> None:
    records = _records(raw)
    newest = max(r.started_at for r in records)
    now = newest - back
    plan = plan_retention(records, policy, now, zone, max_gap=timedelta(days=2000))
    if back > FUTURE_TOLERANCE:
        assert plan.held and plan.prune == [] and plan.clock_problem is not None
        assert "future" in plan.clock_problem
        newest_key = max(records, key=_order).key
        assert plan.decision(newest_key).retention_class == "future"
    else:
        assert plan.clock_problem is None


@settings(max_examples=300, deadline=None)
@given(
    raw=past_records_strategy,
    policy=policy_strategy,
    zone=st.sampled_from(ZONES),
    jump=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=800)),
)
def test_a_backup_taken_with_a_jumped_clock_costs_at_most_one_period_per_rule(
    raw, policy, zone, jump
) -> None:
    """Dagster prunes right after every backup: after a forward clock step the new backup is
    dated in the jumped time and "now" agrees with it, so no clock check can fire. Retention
    counts periods that have backups, so the new one pushes out at most one period per class
    (and one backup from the floor and the newest-verified rule): never the history."""
    records = _records(raw)
    now = max(r.started_at for r in records) + timedelta(hours=1)
    before = plan_retention(records, policy, now, zone)
    assume(not before.held)
    taken = now + jump
    new = BackupRecord("new", taken, "verified", "scheduled")
    after = plan_retention([*records, new], policy, taken + timedelta(minutes=5), zone)
    assert not after.held and "new" in {r.key for r in after.keep}
    lost = _non_safety({r.key for r in before.keep}, records) - {r.key for r in after.keep}
    assert len(lost) <= 5, lost


def test_sixty_one_daily_backups_survive_a_clock_forty_days_ahead() -> None:
    """The reported case: 61 nightly backups, retention 7/4/12, the clock 40 (or 400) days
    ahead. Pruning with that clock used to delete 58 of them (400 days: 60)."""
    policy = RetentionPolicy(7, 4, 12)
    nights = [BackupRecord(f"n{i:02d}", NOW.replace(hour=2) - timedelta(days=i)) for i in range(61)]
    right = plan_retention(nights, policy, NOW, "UTC")
    # 7 days, 3 more Sundays, the ends of February and January.
    assert len(right.keep) == 7 + 3 + 2
    for ahead in (timedelta(days=40), timedelta(days=400)):
        refused = plan_retention(nights, policy, NOW + ahead, "UTC")
        assert refused.clock_problem and refused.prune == []
        # In Dagster the next backup is taken with the jumped clock before pruning runs.
        new = BackupRecord("jumped", NOW + ahead)
        after = plan_retention([*nights, new], policy, NOW + ahead, "UTC")
        assert after.clock_problem is None
        kept = {r.key for r in after.keep}
        # One period per rule moves on, as on any other day: the oldest daily and weekly ones.
        assert {r.key for r in right.keep} - kept == {"n06", "n21"}
        assert len(after.prune) == 61 - 10


def test_safety_backups_stay_while_their_day_is_in_the_daily_window_of_backups() -> None:
    policy = RetentionPolicy(daily=3, weekly=0, monthly=0)
    nights = [BackupRecord(f"n{i}", NOW - timedelta(days=i)) for i in range(5)]
    safety = BackupRecord("safety", NOW - timedelta(days=1, hours=1), purpose="pre-restore")
    # Taken with a clock 30 days fast, the next backup does not push yesterday's safety
    # backup out: it is still among the last three days that have backups.
    jumped = BackupRecord("jumped", NOW + timedelta(days=30))
    plan = plan_retention([*nights, safety, jumped], policy, NOW + timedelta(days=30), "UTC")
    assert plan.decision("safety").keep
    assert plan.decision("safety").retention_class == "safety"


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
