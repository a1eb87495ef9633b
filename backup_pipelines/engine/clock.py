"""The one notion of "now" and of "dated in the future" that every area uses.

Backups are dated by the clock of the host that took them. When that clock was fast (a bad NTP
step, a wrong hardware clock after a reboot), a backup is recorded in the future, and once the
clock is right again it would look like the newest backup for as long as the clock was off.
:func:`is_future` is the single rule for spotting such a backup: dated more than
:data:`FUTURE_TOLERANCE` after now. The tolerance absorbs the small skew between hosts whose
clocks are kept in step by NTP (well under a second) with a wide margin, and stays far below any
backup cadence, so a future-dated backup is never mistaken for a fresh one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

FUTURE_TOLERANCE = timedelta(minutes=5)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC (follows ``faketime`` in tests)."""
    return datetime.now(UTC)


def is_future(moment: datetime, now: datetime | None = None) -> bool:
    """True when ``moment`` lies more than :data:`FUTURE_TOLERANCE` after ``now``."""
    return moment > (now or utc_now()) + FUTURE_TOLERANCE


def age_seconds(moment: datetime, now: datetime | None = None) -> float:
    """How long ago ``moment`` was, never negative (a moment in the future is 0 seconds old)."""
    return max(((now or utc_now()) - moment).total_seconds(), 0.0)
