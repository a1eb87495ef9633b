"""Schedule ticks evaluated at chosen times give the expected run requests, per target."""

import json
import os
import subprocess
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.lib.cadences import build_cadence_schedules, schedule_name
from backup_pipelines.lib.tags import TAG_CADENCE, TAG_DB_HOST, TAG_KIND, TAG_TARGET
from backup_pipelines_tests.conftest import REPO_ROOT, VENV_BIN

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
    # One schedule per set of cadences: each target is in exactly one backup schedule.
    assert backup == {
        "daily_backup_schedule",
        "daily_and_hourly_backup_schedule",
        "nightly_late_and_cron_0_12_x_x_1to5_backup_schedule",
    }
    for name in backup:
        assert schedules[name].default_status == dg.DefaultScheduleStatus.RUNNING
        assert schedules[name].execution_timezone == "Europe/Berlin"
    assert schedules["daily_backup_schedule"].cron_schedule == "0 2 * * *"
    assert set(schedules["daily_and_hourly_backup_schedule"].cron_schedule) == {
        "0 2 * * *",
        "0 * * * *",
    }
    assert set(schedules["nightly_late_and_cron_0_12_x_x_1to5_backup_schedule"].cron_schedule) == {
        "30 4 * * *",
        "0 12 * * 1-5",
    }
    assert "for: shop." in (schedules["daily_and_hourly_backup_schedule"].description or "")


@pytest.mark.slow
def test_daily_tick_requests_one_run_per_daily_target(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    runs = _tick(project_defs, "daily_backup_schedule", SUNDAY.replace(hour=2, tzinfo=tz))
    # archive opted out, shop backs up on its own daily-and-hourly schedule, reports on its own.
    assert set(runs) == {"app"}
    assert runs["app"].asset_selection == [dg.AssetKey(["app", "logical_backup"])]
    assert runs["app"].tags[TAG_DB_HOST] == "pg-main"
    assert runs["app"].tags[TAG_CADENCE] == "daily"
    assert runs["app"].tags[TAG_KIND] == "backup"
    assert runs["app"].run_key == "backup:app:2026-11-22T02:00:00+01:00"
    # The run key makes a repeated evaluation of the same tick idempotent.
    again = _tick(project_defs, "daily_backup_schedule", SUNDAY.replace(hour=2, tzinfo=tz))
    assert again["app"].run_key == runs["app"].run_key
    next_day = _tick(
        project_defs, "daily_backup_schedule", SUNDAY.replace(day=23, hour=2, tzinfo=tz)
    )
    assert next_day["app"].run_key != runs["app"].run_key


@pytest.mark.slow
def test_high_traffic_target_is_backed_up_once_per_tick(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    name = "daily_and_hourly_backup_schedule"
    at_five = _tick(project_defs, name, SUNDAY.replace(hour=5, tzinfo=tz))
    assert set(at_five) == {"shop"}
    assert at_five["shop"].tags[TAG_CADENCE] == "hourly"
    assert at_five["shop"].tags[TAG_DB_HOST] == "db-shop.internal:6432"
    # At 02:00 both cadences are due: one tick, one run, under the cadence listed first.
    schedule = project_defs.resolve_schedule_def(name)
    with dg.instance_for_test() as instance:
        result = schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=instance, scheduled_execution_time=SUNDAY.replace(hour=2, tzinfo=tz)
            )
        )
    (request,) = result.run_requests or []
    assert request.tags[TAG_TARGET] == "shop"
    assert request.tags[TAG_CADENCE] == "daily"
    assert request.run_key == "backup:shop:2026-11-22T02:00:00+01:00"


@pytest.mark.slow
def test_custom_cadences(project_defs: dg.Definitions) -> None:
    tz = ZoneInfo("Europe/Berlin")
    name = "nightly_late_and_cron_0_12_x_x_1to5_backup_schedule"
    late = _tick(project_defs, name, SUNDAY.replace(hour=4, minute=30, tzinfo=tz))
    assert set(late) == {"reports"}
    assert late["reports"].tags[TAG_CADENCE] == "nightly_late"
    monday_noon = _tick(project_defs, name, datetime(2026, 11, 23, 12, tzinfo=tz))
    assert set(monday_noon) == {"reports"}
    assert monday_noon["reports"].tags[TAG_CADENCE] == "custom"


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


def test_schedule_names() -> None:
    assert (
        schedule_name("backup", ["*/15 9-17 * * 1,3"])
        == "cron_xevery15_9to17_x_x_1and3_backup_schedule"
    )
    assert schedule_name("backup", ["daily", "hourly"]) == "daily_and_hourly_backup_schedule"
    assert schedule_name("pitr_drill", ["0 5 * * 0"]) == "cron_0_5_x_x_0_pitr_drill_schedule"


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


FUTURE_TICKS = """{
  scheduleOrError(scheduleSelector: {
    repositoryLocationName: "backup_pipelines", repositoryName: "__repository__",
    scheduleName: "daily_and_hourly_backup_schedule"
  }) {
    ... on Schedule {
      autumn: futureTicks(cursor: %(autumn)s, limit: 26) { results { timestamp } }
      spring: futureTicks(cursor: %(spring)s, limit: 24) { results { timestamp } }
    }
    ... on PythonError { message }
    ... on ScheduleNotFoundError { message }
  }
}"""


@pytest.mark.slow
def test_scheduler_backs_up_a_high_traffic_target_every_hour_once_across_dst(
    project_defs: dg.Definitions,
) -> None:
    """The times Dagster's scheduler will run the daily-and-hourly schedule (as the UI lists its
    next ticks): every hour of the days the clocks change in Berlin, each exactly once, the daily
    02:00 included. The night the clocks go back has two 02:00s; both get a backup."""
    tz = ZoneInfo("Europe/Berlin")
    autumn = datetime(2026, 10, 25, tzinfo=tz).timestamp()  # 25 hours long
    spring = datetime(2026, 3, 29, tzinfo=tz).timestamp()  # 23 hours, no 02:00
    query = FUTURE_TICKS % {"autumn": int(autumn), "spring": int(spring)}
    done = subprocess.run(
        [
            str(VENV_BIN / "dagster-graphql"),
            "-w",
            str(REPO_ROOT / "deploy" / "workspace.yaml"),
            "--ephemeral-instance",
            "-t",
            query,
        ],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    schedule = answer["data"]["scheduleOrError"]
    assert "message" not in schedule, schedule

    autumn_ticks = [t["timestamp"] for t in schedule["autumn"]["results"]]
    spring_ticks = [t["timestamp"] for t in schedule["spring"]["results"]]
    # 25 hours, then the next day's 00:00; with duplicates or a missed hour this list differs.
    assert autumn_ticks == [autumn + h * 3600 for h in range(26)]
    assert datetime(2026, 10, 25, 2, fold=0, tzinfo=tz).timestamp() in autumn_ticks
    assert datetime(2026, 10, 25, 2, fold=1, tzinfo=tz).timestamp() in autumn_ticks
    # 23 hours (the daily 02:00 runs at 03:00, with the hourly one), then the next 00:00.
    assert spring_ticks == [spring + h * 3600 for h in range(24)]
