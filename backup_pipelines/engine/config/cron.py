"""Cadences and cron strings: the named cadences, full validation of a cron string (the same
parser Dagster's schedules use), and the ``schedules:`` values of a target."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

from backup_pipelines.engine.config.fields import OPT_OUT_WORDS

# Named cadences every target can use in its `schedules:`; the top-level `cadences:` key adds
# names or overrides these. Times are in the targets file's `timezone`.
BUILTIN_CADENCES: dict[str, str] = {
    "hourly": "0 * * * *",
    "daily": "0 2 * * *",
    "weekly": "0 3 * * 0",
    "monthly": "0 4 1 * *",
}
CADENCE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_CRON_FIELD_PATTERN = re.compile(r"^[0-9A-Za-z*/,\-]+$")
# Field names and what each accepts, for messages (cron's own ranges, as croniter checks them).
_CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
)
_DAYS_IN_MONTH = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}


def looks_like_cron(value: str) -> bool:
    """Several whitespace-separated fields: meant as a cron string (valid or not), never a
    cadence name (names have no spaces)."""
    return len(value.split()) > 1


def cron_problem(value: str) -> str | None:
    """Why ``value`` is not a cron string the schedules accept; None when it is.

    The same parser Dagster's schedules use (croniter) checks every field's range, names, lists,
    ranges and steps, plus Dagster's own rules (exactly five fields; no 30th or 31st of
    February). Only digits, names and ``* / , -`` are allowed, and a day that no listed month
    has is refused: such a schedule would never fire.
    """
    # Imported here: most runs (wal-push once per WAL segment) never check a cron string.
    from croniter import croniter

    fields = value.split()
    if len(fields) != 5:
        return (
            f"{value!r} has {len(fields)} field(s); a cron string has 5: minute hour "
            "day-of-month month day-of-week, e.g. '30 1 * * *'"
        )
    for index, (field, (label, allowed)) in enumerate(zip(fields, _CRON_FIELDS, strict=True)):
        if not _CRON_FIELD_PATTERN.match(field):
            return (
                f"{value!r}: the {label} field {field!r} may only use digits, names, "
                "'*', '/', ',' and '-'"
            )
        alone = " ".join(field if i == index else "*" for i in range(5))
        if not croniter.is_valid(alone):
            return (
                f"{value!r}: the {label} field {field!r} is not valid (values {allowed}; "
                "lists a,b; ranges a-b; steps */n or a-b/n)"
            )
    if not croniter.is_valid(value):
        return f"{value!r} is not a valid cron string"
    expanded, *_ = croniter.expand(value)
    if len(expanded) != 5:
        return f"{value!r} is not a five-field cron string"
    days, months, weekdays = expanded[2], expanded[3], expanded[4]
    if months == [2] and len(days) == 1 and days[0] in (30, 31):
        return f"{value!r}: February has no day {days[0]} (Dagster refuses this schedule)"
    numeric_days = [d for d in days if isinstance(d, int)]
    # With day-of-week unrestricted, the day must exist in one of the months.
    if (
        weekdays == ["*"]
        and months != ["*"]
        and numeric_days
        and len(numeric_days) == len(days)
        and min(numeric_days) > max(_DAYS_IN_MONTH[int(m)] for m in months)
    ):
        return f"{value!r} never fires: none of its months has that day"
    return None


def _normalize_cadences(value: Any) -> Any:
    """A cadence name, a cron string, a list of them, or off/none/false/[] to opt out."""
    if value is None or value is False:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"{item!r} is not a cadence name or a cron string")
            if item.strip().lower() in OPT_OUT_WORDS:
                continue
            items.append(" ".join(item.split()))
        return tuple(dict.fromkeys(items))
    raise ValueError(
        "a cadence is a name (hourly, daily, weekly, monthly or one under 'cadences:'), a cron "
        "string like '30 1 * * *', a list of those, or off"
    )


# The kinds of scheduled work a target's ``schedules:`` may set (README "Running in production").
SCHEDULE_KINDS = ("backup", "restore_drill", "base_backup", "pitr_drill")


def _valid_crons(value: tuple[str, ...]) -> tuple[str, ...]:
    for cadence in value:
        problem = cron_problem(cadence) if looks_like_cron(cadence) else None
        if problem:
            raise ValueError(problem)
    return value


# Named cadences are checked against the file's `cadences:` by ProjectConfig; cron strings here.
Cadences = Annotated[
    tuple[str, ...], BeforeValidator(_normalize_cadences), AfterValidator(_valid_crons)
]
