"""Schedule ticks evaluated at chosen times give the expected run requests, per target."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.lib.cadences import build_cadence_schedules, fires_at, schedule_name
from backup_pipelines.lib.tags import TAG_CADENCE, TAG_DB_HOST, TAG_TARGET

SUNDAY = datetime(2026, 11, 22)  # a Sunday


def _targets() -> dict[str, dict]:
    return {
        "app": {"dsn_env": "DB_APP", "db_host": "pg-main"},
        "shop": {"dsn_env": "DB_SHOP", "high_traffic": True},
        "archive": {"dsn_env": "DB_ARCHIVE", "schedules": {"backup": "off"}},
        "reports": {
            "dsn_env": "DB_REPORTS",
            "schedules": {"backup": ["nightly_late", "0 12 * * 1-5"]},
        },
    }


def _tick(defs: dg.Definitions, name: str, when: datetime) -> dict[str, dg.RunRequest]:
    schedule = defs.resolve_schedule_def(name)
    with dg.instance_for_test() as instance:
        result = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
        )
    return {r.tags[TAG_TARGET]: r for r in (result.run_requests or [])}


@pytest.fixture
def project_defs(make_project) -> dg.Definitions:
    make_project(
        _targets(),
        env={"DB_SHOP": "postgresql://u@db-shop.internal:6432/shop"},
        timezone="Europe/Berlin",
        cadences={"nightly_late": "30 4 * * *"},
    )
    return load_defs()


def test_schedules_exist_running_in_the_configured_timezone(project_defs: dg.Definitions) -> None:
    schedules = {s.name: s for s in project_defs.schedules}
    backup = {n for n in schedules if n.endswith("_backup_schedule")}
    assert backup == {
        "daily_backup_schedule",
        "hourly_backup_schedule",
        "nightly_late_backup_schedule",
        "cron_0_12_x_x_1to5_backup_schedule",
    }
    for name in backup:
        assert schedules[name].default_status == dg.DefaultScheduleStatus.RUNNING
        assert schedules[name].execution_timezone == "Europe/Berlin"
    assert schedules["daily_backup_schedule"].cron_schedule == "0 2 * * *"
    assert schedules["hourly_backup_schedule"].cron_schedule == "0 * * * *"


@pytest.mark.slow
def test_daily_tick_requests_one_run_per_daily_target(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    runs = _tick(project_defs, "daily_backup_schedule", SUNDAY.replace(hour=2, tzinfo=tz))
    # archive opted out, reports uses its own cadences.
    assert set(runs) == {"app", "shop"}
    assert runs["app"].asset_selection == [dg.AssetKey(["app", "logical_backup"])]
    assert runs["app"].tags[TAG_DB_HOST] == "pg-main"
    assert runs["shop"].tags[TAG_DB_HOST] == "db-shop.internal:6432"
    assert runs["app"].tags[TAG_CADENCE] == "daily"
    # The run key makes a repeated evaluation of the same tick idempotent.
    again = _tick(project_defs, "daily_backup_schedule", SUNDAY.replace(hour=2, tzinfo=tz))
    assert again["app"].run_key == runs["app"].run_key
    next_day = _tick(
        project_defs, "daily_backup_schedule", SUNDAY.replace(day=23, hour=2, tzinfo=tz)
    )
    assert next_day["app"].run_key != runs["app"].run_key


@pytest.mark.slow
def test_hourly_tick_backs_up_high_traffic_targets_only_once(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    at_five = _tick(project_defs, "hourly_backup_schedule", SUNDAY.replace(hour=5, tzinfo=tz))
    assert set(at_five) == {"shop"}
    assert at_five["shop"].tags[TAG_CADENCE] == "hourly"
    # At 02:00 the daily schedule already backs shop up: the hourly one must not do it again.
    schedule = project_defs.resolve_schedule_def("hourly_backup_schedule")
    with dg.instance_for_test() as instance:
        result = schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=instance, scheduled_execution_time=SUNDAY.replace(hour=2, tzinfo=tz)
            )
        )
    assert not result.run_requests
    assert result.skip_message


@pytest.mark.slow
def test_custom_cadences(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    late = _tick(
        project_defs, "nightly_late_backup_schedule", SUNDAY.replace(hour=4, minute=30, tzinfo=tz)
    )
    assert set(late) == {"reports"}
    monday_noon = datetime(2026, 11, 23, 12, tzinfo=tz)
    assert set(_tick(project_defs, "cron_0_12_x_x_1to5_backup_schedule", monday_noon)) == {
        "reports"
    }


def test_other_areas_build_weekly_schedules_with_the_helper(make_project) -> None:
    make_project(
        {
            "app": {"dsn_env": "DB_APP"},
            "shop": {"dsn_env": "DB_SHOP", "schedules": {"restore_drill": "off"}},
            "erp": {"dsn_env": "DB_ERP", "schedules": {"restore_drill": "monthly"}},
        }
    )
    schedules = build_cadence_schedules(
        kind="restore_drill",
        asset_names=["logical_backup", "restore_drill"],
        default_cadences=["weekly"],
    )
    by_name = {s.name: s for s in schedules}
    assert set(by_name) == {"weekly_restore_drill_schedule", "monthly_restore_drill_schedule"}
    weekly = by_name["weekly_restore_drill_schedule"]
    assert weekly.cron_schedule == "0 3 * * 0"
    assert weekly.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.instance_for_test() as instance:
        result = weekly.evaluate_tick(
            dg.build_schedule_context(
                instance=instance,
                scheduled_execution_time=SUNDAY.replace(hour=3, tzinfo=ZoneInfo("UTC")),
            )
        )
    (request,) = result.run_requests
    assert request.tags[TAG_TARGET] == "app"
    assert request.asset_selection == [
        dg.AssetKey(["app", "logical_backup"]),
        dg.AssetKey(["app", "restore_drill"]),
    ]


def test_fires_at_respects_timezone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert fires_at("0 3 * * 0", SUNDAY.replace(hour=3, tzinfo=berlin), "Europe/Berlin")
    assert not fires_at("0 3 * * 0", SUNDAY.replace(hour=3, tzinfo=berlin), "UTC")
    assert not fires_at("0 3 * * 0", datetime(2026, 11, 23, 3, tzinfo=berlin), "Europe/Berlin")
    assert (
        schedule_name("backup", "*/15 9-17 * * 1,3")
        == "cron_xevery15_9to17_x_x_1and3_backup_schedule"
    )


def test_unknown_cadence_is_a_clear_config_error(make_project) -> None:
    with pytest.raises(
        ConfigError, match=r"target 'app'.*schedules.backup.*unknown cadence 'dayly'"
    ):
        make_project({"app": {"dsn_env": "DB_APP", "schedules": {"backup": "dayly"}}})


def test_max_age_durations_and_opt_out(make_project) -> None:
    config = make_project(
        {
            "default": {"dsn_env": "A"},
            "short": {"dsn_env": "B", "max_age": "1h30m"},
            "seconds": {"dsn_env": "C", "max_age": 90},
            "elsewhere": {"dsn_env": "D", "max_age": "off"},
        }
    )
    assert config.targets["default"].max_age == timedelta(hours=24)
    assert config.targets["short"].max_age == timedelta(minutes=90)
    assert config.targets["seconds"].max_age == timedelta(seconds=90)
    assert config.targets["elsewhere"].max_age is None
    specs = {
        spec.key.path[0]: spec
        for spec in load_defs().resolve_all_asset_specs()
        if spec.key.path[-1] == "logical_backup"
    }
    assert specs["short"].freshness_policy.fail_window.to_timedelta() == timedelta(minutes=90)
    assert specs["elsewhere"].freshness_policy is None
    with pytest.raises(ConfigError, match=r"target 'bad', field 'max_age'.*not a duration"):
        make_project({"bad": {"dsn_env": "A", "max_age": "soon"}})


def _dagster_ticks(cron: str, timezone: str, start: datetime, end: datetime) -> set[float]:
    """When Dagster's scheduler runs ``cron``, from its own cron iteration: each time window
    of a partitions definition on that cron starts at one tick."""
    partitions = dg.TimeWindowPartitionsDefinition(
        start=start, cron_schedule=cron, timezone=timezone, fmt="%Y-%m-%dT%H:%M%z"
    )
    keys = partitions.get_partition_keys(current_time=end + timedelta(days=40))
    ticks = (datetime.strptime(key, "%Y-%m-%dT%H:%M%z").timestamp() for key in keys)
    return {t for t in ticks if t < end.timestamp()}


@pytest.mark.parametrize("timezone", ["Europe/Berlin", "America/New_York"])
def test_fires_at_agrees_with_dagster_across_daylight_saving_changes(timezone: str) -> None:
    """Coinciding ticks are detected exactly when Dagster runs them: a 02:30 that does not exist
    runs at 03:00, a 02:30 that happens twice runs once, hourly schedules run at both."""
    zone = ZoneInfo(timezone)
    start, end = datetime(2026, 1, 1, tzinfo=zone), datetime(2027, 1, 1, tzinfo=zone)
    changes = [
        hour
        for hour in range(int(start.timestamp()), int(end.timestamp()), 3600)
        if datetime.fromtimestamp(hour, zone).utcoffset()
        != datetime.fromtimestamp(hour + 3600, zone).utcoffset()
    ]
    assert len(changes) == 2
    minutes = [change + m * 60 for change in changes for m in range(-240, 241)]
    for cron in ("0 2 * * *", "30 2 * * *", "0 * * * *", "30 2 * * 0", "*/20 1-3 * * *"):
        ticks = _dagster_ticks(cron, timezone, start, end)
        for moment in minutes:
            expected = moment in ticks
            when = datetime.fromtimestamp(moment, UTC)
            assert fires_at(cron, when, timezone) == expected, (
                f"{cron} at {datetime.fromtimestamp(moment, zone).isoformat()}: "
                f"Dagster {'runs' if expected else 'does not run'} it"
            )
