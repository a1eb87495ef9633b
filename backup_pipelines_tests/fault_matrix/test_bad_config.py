"""Fault matrix, bad configuration: every broken targets file gets one clear line and exit 2.

Each case runs the command line against a real file and asserts the exit status, a single error
line that says what is wrong (and where), and no traceback: most through ``main()`` in the test
process (``cli``, the same code and exit status without an interpreter start per case), a few
through the installed ``backup-pipelines`` command (``run_cli``) so the entry point's exit
statuses are proven too. The last part proves the Dagster side: one target's bad settings
never take the others down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.config import cron_problem, load_config
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines_tests.alert_receivers import webhook_receiver
from backup_pipelines_tests.conftest import DB_PASSWORD, VENV_BIN
from backup_pipelines_tests.fault_matrix.clear_errors import (
    assert_clear_error,
    assert_reported,
    run_as,
    second_os_user,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, text: str | bytes, name: str = "targets.yaml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def document(tmp_path: Path, **target: object) -> str:
    spec = {"dsn_env": "DB_PROD", **target}
    return yaml.safe_dump({"backup_root": str(tmp_path / "b"), "targets": {"prod": spec}})


# --- the file itself ---------------------------------------------------------------------------


def test_non_utf8_targets_file(tmp_path: Path, run_cli) -> None:
    path = write(tmp_path, b"backup_root: b\ntargets:\n  prod:\n    description: caf\xe9\n")
    result = run_cli("--config", str(path), "backup", "prod")
    assert_clear_error(result, 2, "not UTF-8", "line 4", "save it as UTF-8")


def test_config_pointing_at_a_folder(tmp_path: Path, cli) -> None:
    result = cli("--config", str(tmp_path), "check-config")
    assert_clear_error(result, 2, "is a folder, not a file", "backup_targets.yaml")


def test_config_missing(tmp_path: Path, cli) -> None:
    result = cli("--config", str(tmp_path / "nope.yaml"), "list", "prod")
    assert_clear_error(result, 2, "targets file not found")


def test_config_that_is_not_a_regular_file(cli) -> None:
    # /dev/zero would be read forever; a device is refused before reading.
    result = cli("--config", "/dev/zero", "check-config")
    assert_clear_error(result, 2, "not a regular file")


@pytest.mark.xdist_group("os-users")
@pytest.mark.slow
def test_config_unreadable_for_the_user_running_the_command() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bp-unreadable-"))
    try:
        folder.chmod(0o755)
        path = write(folder, "backup_root: b\ntargets: {}\n")
        path.chmod(0o600)  # root's file; the other user may not read it
        with second_os_user() as user:
            result = run_as(user, folder, "--config", str(path), "check-config")
        assert_clear_error(result, 2, "cannot be read", "permission denied", "chmod/chown")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("", ["is empty"]),
        ("- a\n- b\n", ["must be a mapping"]),
        ("backup_root: b\ntargets: [unclosed\n", ["not valid YAML", "line 3, column 1"]),
        ("backup_root: b\ntargets:\n\tprod: {}\n", ["not valid YAML", "line 3"]),
        ("backup_root: b\x00\ntargets: {}\n", ["not valid YAML", "#x0000"]),
    ],
    ids=["empty", "a-list", "unclosed-bracket", "tab-indent", "nul-byte"],
)
def test_unusable_yaml(tmp_path: Path, cli, text: str, phrases: list[str]) -> None:
    result = cli("--config", str(write(tmp_path, text)), "check-config")
    assert_clear_error(result, 2, *phrases)


def test_duplicate_target_names_are_refused_with_both_lines(tmp_path: Path, cli) -> None:
    """Plain YAML keeps the second 'prod': backups would silently go to another database."""
    text = (
        "backup_root: b\n"
        "targets:\n"
        "  prod:\n"
        "    dsn_env: DATABASE_URL_PROD\n"
        "  staging:\n"
        "    dsn_env: DATABASE_URL_STAGING\n"
        "  prod:\n"
        "    dsn_env: DATABASE_URL_OTHER\n"
    )
    result = cli("--config", str(write(tmp_path, text)), "backup", "prod")
    assert_clear_error(result, 2, "duplicate key 'prod'", "at line 7", "first at line 3")


@pytest.mark.parametrize(
    "text",
    [
        "backup_root: b\nbackup_root: c\ntargets: {}\n",
        "backup_root: b\ntargets:\n  prod:\n    dsn_env: A\n    dsn_env: B\n",
        "backup_root: b\ntargets:\n  prod:\n    dsn_env: A\n    retention: {daily: 7, daily: 70}\n",
    ],
    ids=["top-level", "inside-a-target", "flow-mapping"],
)
def test_duplicate_keys_at_any_level(tmp_path: Path, cli, text: str) -> None:
    result = cli("--config", str(write(tmp_path, text)), "check-config")
    assert_clear_error(result, 2, "duplicate key")


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    """``<<: *anchor`` overrides are normal YAML, not duplicates."""
    text = (
        "backup_root: b\n"
        "x-common: &common {dsn_env: DB_A, format: custom}\n"
        "targets:\n"
        "  a:\n"
        "    <<: *common\n"
        "    format: plain\n"
    )
    with pytest.raises(ConfigError, match="x-common"):  # unknown top-level key, not a duplicate
        load_config(write(tmp_path, text))
    text = text.replace("x-common: &common", "defaults: &common")
    assert load_config(write(tmp_path, text)).targets["a"].format == "plain"


# --- values -----------------------------------------------------------------------------------

BAD_VALUES = [
    # (target settings, phrases in the message)
    ({"retention": {"daily": 5_000_000}}, ["retention.daily", "less than or equal to 3660"]),
    ({"retention": {"weekly": 100_000}}, ["retention.weekly", "less than or equal to 520"]),
    ({"retention": {"monthly": 100_000_000}}, ["retention.monthly", "less than or equal to 1200"]),
    ({"retention": {"daily": -1}}, ["retention.daily", "greater than or equal to 0"]),
    ({"retention": {"partial_max_age_hours": 0}}, ["partial_max_age_hours"]),
    ({"max_age": "99999999999999d"}, ["max_age", "far too long"]),
    ({"max_age": -5}, ["max_age", "not a sensible duration"]),
    ({"max_age": 0}, ["max_age", "not a sensible duration"]),
    ({"restore": {"rto_target_seconds": float("inf")}}, ["rto_target_seconds", "finite"]),
    ({"restore": {"rto_target_seconds": float("nan")}}, ["rto_target_seconds", "finite"]),
    ({"restore": {"drop_previous_after_hours": 1e20}}, ["drop_previous_after_hours"]),
    ({"restore_jobs": 0}, ["restore_jobs"]),
    ({"compression_level": -1}, ["compression_level -1 is out of range"]),
    ({"size_drop_warn_ratio": 0}, ["size_drop_warn_ratio"]),
    ({"pg_bin_dir": "usr/lib/postgresql/15/bin"}, ["pg_bin_dir", "absolute path"]),
    ({"pg_bin_dir": ""}, ["pg_bin_dir", "is empty"]),
    ({"pitr": {"archive_dir": "wal"}}, ["pitr.archive_dir", "absolute path"]),
    ({"pitr": {"archive_dir": "/w", "drill_port": 80}}, ["pitr.drill_port"]),
    ({"pitr": {"archive_dir": "/w", "drill_timeout_minutes": 1e9}}, ["drill_timeout_minutes"]),
    ({"pitr": {"archive_dir": "/w", "archive_lag_limit_minutes": -1}}, ["archive_lag_limit"]),
    ({"offsite": {"lifecycle": {"expire_after_days": 10**12}}}, ["expire_after_days"]),
    ({"schedules": {"bakup": "off"}}, ["schedules", "unknown kind", "'bakup'"]),
    ({"schedules": {"backup": "nightly"}}, ["schedules.backup", "unknown cadence 'nightly'"]),
    ({"dsn_env": "not a variable"}, ["dsn_env", "not a valid environment variable name"]),
]


@pytest.mark.parametrize(
    ("target", "phrases"),
    BAD_VALUES,
    ids=[f"{'-'.join(map(str, t))}-{i}" for i, (t, _p) in enumerate(BAD_VALUES)],
)
def test_bad_values_are_refused_with_target_and_field(
    tmp_path: Path, cli, target: dict, phrases: list[str]
) -> None:
    path = write(tmp_path, document(tmp_path, **target))
    line = assert_clear_error(
        cli("--config", str(path), "backup", "prod"), 2, "target 'prod'", *phrases
    )
    assert "What to do" in line
    assert_reported(cli("--config", str(path), "check-config"), "target 'prod'", *phrases)


@pytest.mark.parametrize(
    ("top", "phrases"),
    [
        ({"backup_root": ""}, ["backup_root is empty"]),
        ({"backup_root": None}, ["backup_root is empty"]),
        ({"timezone": "Mars/Olympus"}, ["unknown timezone"]),
        ({"cadences": {"late": "61 4 * * *"}}, ["cadence 'late'", "minute field '61'"]),
        ({"metrics": {"textfile": "metrics.prom"}}, ["metrics.textfile", "absolute path"]),
        (
            {"notifiers": [{"type": "email", "host": "h", "port": 0, "sender": "a", "to": ["b"]}]},
            ["notifiers.0.email.port"],
        ),
        (
            {
                "notifiers": [
                    {"type": "email", "host": "h", "sender": "a", "to": ["b"], "ca_file": "ca.pem"}
                ]
            },
            ["ca_file", "absolute path"],
        ),
    ],
    ids=[
        "empty-backup-root",
        "null-backup-root",
        "timezone",
        "named-cadence",
        "textfile",
        "port",
        "ca-file",
    ],
)
def test_bad_top_level_values(tmp_path: Path, cli, top: dict, phrases: list[str]) -> None:
    text = yaml.safe_dump(
        {"backup_root": str(tmp_path / "b"), **top, "targets": {"prod": {"dsn_env": "DB"}}}
    )
    result = cli("--config", str(write(tmp_path, text)), "check-config")
    assert_clear_error(result, 2, *phrases)


def test_empty_backup_root_never_uses_the_folder_of_the_targets_file(tmp_path: Path, cli) -> None:
    path = write(tmp_path, 'backup_root: ""\ntargets:\n  prod: {dsn_env: DB}\n')
    result = cli("--config", str(path), "backup", "prod", env={"DB": "postgresql://u@h/db"})
    assert_clear_error(result, 2, "backup_root is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["targets.yaml"]


# --- cron values ------------------------------------------------------------------------------

BAD_CRONS = [
    ("61 25 * * *", "minute field '61'"),
    ("0 24 * * *", "hour field '24'"),
    ("0 2 32 * *", "day-of-month field '32'"),
    ("0 2 0 * *", "day-of-month field '0'"),
    ("0 2 * 13 *", "month field '13'"),
    ("0 2 * * 8", "day-of-week field '8'"),
    ("0 2 * * mon-xyz", "day-of-week field 'mon-xyz'"),
    ("0 2 * foo *", "month field 'foo'"),
    ("*/0 * * * *", "minute field '*/0'"),
    ("0 2 1,,2 * *", "day-of-month field '1,,2'"),
    ("0 2 * * ?", "may only use"),
    ("0 0 30 2 *", "February has no day 30"),
    ("0 0 31 4,6,9 *", "never fires"),
    ("0 0 * * * *", "has 6 field(s)"),
    ("0 2 * *", "has 4 field(s)"),
]


@pytest.mark.parametrize(("cron", "phrase"), BAD_CRONS, ids=[c for c, _ in BAD_CRONS])
def test_bad_cron_values_fail_at_load_and_in_check_config(
    tmp_path: Path, cli, cron: str, phrase: str
) -> None:
    path = write(tmp_path, document(tmp_path, schedules={"backup": cron}))
    report = assert_reported(cli("--config", str(path), "check-config"), "target 'prod'", phrase)
    assert "schedules.backup" in report
    result = cli("--config", str(path), "backup", "prod")
    assert_clear_error(result, 2, "target 'prod' cannot be used", phrase)


def test_dagster_rejects_the_cron_values_we_reject() -> None:
    for cron, phrase in BAD_CRONS:
        assert cron_problem(cron) is not None
        # We are stricter than Dagster on two: a day no listed month has (the schedule would
        # never fire) and characters beyond digits, names and * / , - ('?').
        if "never fires" not in phrase and "may only use" not in phrase:
            assert not is_valid_cron_string(cron), cron


@dg.op
def _noop() -> None:
    pass


@dg.job
def _noop_job() -> None:
    _noop()


def is_valid_cron_string(cron: str) -> bool:
    """Whether Dagster accepts ``cron`` for a schedule (its public definition API decides)."""
    try:
        dg.ScheduleDefinition(name="probe", cron_schedule=cron, job=_noop_job)
    except dg.DagsterInvalidDefinitionError:
        return False
    return True


FIELD = st.one_of(
    st.just("*"),
    st.integers(-1, 62).map(str),
    st.sampled_from(["jan", "feb", "dec", "mon", "sun", "fri-mon", "mon-fri", "L", "?", "x"]),
    st.tuples(st.integers(0, 62), st.integers(0, 62)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.integers(0, 62).map(lambda n: f"*/{n}"),
    st.lists(st.integers(0, 62), min_size=2, max_size=3).map(lambda xs: ",".join(map(str, xs))),
)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.lists(FIELD, min_size=4, max_size=6))
def test_what_passes_us_passes_dagster(fields: list[str]) -> None:
    """Property: a cron string the targets file accepts is one Dagster's schedules accept."""
    cron = " ".join(fields)
    if cron_problem(cron) is None:
        assert is_valid_cron_string(cron), cron


# --- connection URLs and what check-config must catch -----------------------------------------


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        (f"postgresql://app:{DB_PASSWORD}@db:abc/app", "invalid port 'abc'"),
        (f"postgresql://app:{DB_PASSWORD}@db:99999/app", "invalid port '99999'"),
        (f"postgres//app:{DB_PASSWORD}@db/app", "not a valid libpq connection string"),
        (f"mysql://app:{DB_PASSWORD}@db/app", "not a valid libpq connection string"),
        (f"postgresql://app:{DB_PASSWORD}@db/app?sslmode=bogus", "invalid sslmode 'bogus'"),
        (f"postgresql://app:{DB_PASSWORD}@db/app?connect_timeout=x", "invalid connect_timeout"),
        (f"postgresql://app:{DB_PASSWORD}@db/app?nosuch=1", "not a valid libpq connection"),
    ],
    ids=[
        "port-word",
        "port-range",
        "no-scheme-colon",
        "other-scheme",
        "sslmode",
        "connect-timeout",
        "unknown-option",
    ],
)
def test_malformed_connection_url(tmp_path: Path, cli, url: str, phrase: str) -> None:
    path = write(tmp_path, document(tmp_path))
    result = cli("--config", str(path), "backup", "prod", env={"DB_PROD": url})
    assert_clear_error(result, 2, "target 'prod'", "DB_PROD", phrase)
    check = cli("--config", str(path), "check-config", env={"DB_PROD": url})
    assert_reported(check, "target 'prod'", phrase)
    for output in (result, check):
        assert DB_PASSWORD not in output.stdout + output.stderr


def test_check_config_catches_missing_client_tools(tmp_path: Path, cli) -> None:
    empty = tmp_path / "pgbin"
    empty.mkdir()
    (empty / "pg_dump").write_text("#!/bin/sh\n")  # present but not executable
    text = yaml.safe_dump(
        {
            "backup_root": str(tmp_path / "b"),
            "targets": {
                "gone": {"dsn_env": "DB", "pg_bin_dir": str(tmp_path / "missing")},
                "partial": {"dsn_env": "DB", "pg_bin_dir": str(empty)},
            },
        }
    )
    result = cli(
        "--config", str(write(tmp_path, text)), "check-config", env={"DB": "postgresql://h/db"}
    )
    assert_reported(result, "target 'gone'", "pg_bin_dir", "does not exist")
    assert_reported(result, "target 'partial'", "pg_dump", "not an executable file")
    assert_reported(result, "target 'partial'", "psql not found in")
    assert_reported(result, "target 'partial'", "pg_restore not found in")


def test_check_config_catches_a_backup_root_that_cannot_be_written(tmp_path: Path, cli) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for root, phrase in ((blocker, "is not a folder"), (blocker / "sub", "is a file")):
        text = yaml.safe_dump({"backup_root": str(root), "targets": {"p": {"dsn_env": "DB"}}})
        result = cli(
            "--config", str(write(tmp_path, text)), "check-config", env={"DB": "postgresql://h/db"}
        )
        assert_reported(result, "backup_root", phrase)


def test_check_config_passes_a_good_file(tmp_path: Path, run_cli) -> None:
    path = write(tmp_path, document(tmp_path, schedules={"backup": ["daily", "30 4 * * 1-5"]}))
    result = run_cli("--config", str(path), "check-config", env={"DB_PROD": "postgresql://h/db"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 target(s)" in result.stdout


# --- one broken target never takes the others down --------------------------------------------


def two_targets(tmp_path: Path, dsn: str) -> Path:
    text = yaml.safe_dump(
        {
            "backup_root": str(tmp_path / "backups"),
            "targets": {
                "good": {"dsn_env": "DB_GOOD", "schedules": {"backup": "30 1 * * *"}},
                "bad": {"dsn_env": "DB_BAD", "schedules": {"backup": "61 25 * * *"}},
                "my-db": {"dsn_env": "DB_BAD"},
            },
        }
    )
    return write(tmp_path, text)


def test_cli_backs_up_the_good_target_beside_a_broken_one(
    tmp_path: Path, cli, pg: LocalCluster, sample_db: str
) -> None:
    path = two_targets(tmp_path, pg.dsn(sample_db))
    env = {"DB_GOOD": pg.dsn(sample_db), "DB_BAD": pg.dsn(sample_db)}
    good = cli("--config", str(path), "backup", "good", env=env)
    assert good.returncode == 0, good.stderr
    assert "target 'bad' is skipped" in good.stderr and "minute field '61'" in good.stderr
    assert len(list((tmp_path / "backups" / "good").glob("*.sql.gz"))) == 1

    bad = cli("--config", str(path), "backup", "bad", env=env)
    assert_clear_error(bad, 2, "target 'bad' cannot be used", "minute field '61'")
    assert not (tmp_path / "backups" / "bad").exists()


def test_metrics_keep_reporting_a_broken_target_as_failing(tmp_path: Path, run_cli) -> None:
    """Dropping its series would quietly resolve the Prometheus alerts on it."""
    textfile = tmp_path / "prom" / "backup_pipelines.prom"
    path = two_targets(tmp_path, "postgresql://u@127.0.0.1:1/db")
    result = run_cli("--config", str(path), "metrics", "--textfile", str(textfile))
    assert result.returncode == 0, result.stderr
    text = textfile.read_text()
    assert 'backup_pipelines_backup_success{target="bad"} 0.0' in text
    assert 'backup_pipelines_backup_success{target="my-db"} 0.0' in text


@pytest.fixture
def broken_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from backup_pipelines.lib.project import project_config

    path = two_targets(tmp_path, "postgresql://u@127.0.0.1:1/db")
    monkeypatch.setenv("BACKUP_PIPELINES_CONFIG", str(path))
    project_config.cache_clear()
    yield path
    project_config.cache_clear()


@pytest.mark.slow
def test_definitions_load_the_good_target_and_show_the_broken_one(broken_project: Path) -> None:
    from backup_pipelines.definitions import defs as load_defs
    from backup_pipelines.lib.tags import TAG_TARGET

    defs = load_defs()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"good/logical_backup", "good/restore_drill", "good/backup_inventory"} <= keys
    # The broken targets are visible, each with one placeholder carrying its error.
    assert {k for k in keys if not k.startswith("good/")} == {
        "bad/logical_backup",
        "invalid_my_db/logical_backup",
    }
    bad = defs.resolve_assets_def(dg.AssetKey(["bad", "logical_backup"]))
    spec = next(iter(bad.specs))
    assert "CONFIGURATION ERROR" in (spec.description or "")
    assert "minute field '61'" in (spec.description or "")
    assert "minute field '61'" in str(spec.metadata["configuration_error"].value)
    renamed = defs.resolve_assets_def(dg.AssetKey(["invalid_my_db", "logical_backup"]))
    assert "target name 'my-db'" in (next(iter(renamed.specs)).description or "")

    # The good target's schedule exists and its tick requests a run for it alone.
    schedule = defs.resolve_schedule_def("cron_30_1_x_x_x_backup_schedule")
    with dg.instance_for_test() as instance:
        from datetime import datetime
        from zoneinfo import ZoneInfo

        tick = schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=instance,
                scheduled_execution_time=datetime(2026, 11, 24, 1, 30, tzinfo=ZoneInfo("UTC")),
            )
        )
    assert [r.tags[TAG_TARGET] for r in tick.run_requests or []] == ["good"]
    assert not [s for s in defs.schedules if "61" in s.name]

    # Materializing the placeholder fails with the message, never a traceback of ours.
    with dg.instance_for_test() as instance:
        result = dg.materialize([bad], instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    text = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert "target 'bad' is not backed up" in text and "minute field '61'" in text


@pytest.mark.slow
def test_dagster_definitions_validate_passes_with_a_broken_target(broken_project: Path) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BACKUP_PIPELINES_CONFIG": str(broken_project)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_broken_target_alerts_once_and_resolves_when_fixed(
    broken_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backup_pipelines.definitions import defs as load_defs
    from backup_pipelines.defs.resources import BackupEngineResource
    from backup_pipelines.lib.project import project_config

    with webhook_receiver() as hooks:
        document = yaml.safe_load(broken_project.read_text())
        document["notifiers"] = [{"type": "webhook", "url": f"{hooks.url}/hook"}]
        del document["targets"]["my-db"]
        broken_project.write_text(yaml.safe_dump(document))
        project_config.cache_clear()
        sensor = load_defs().resolve_sensor_def("stale_backup_sensor")
        with dg.instance_for_test() as instance:

            def tick(cursor: str | None) -> str | None:
                context = dg.build_sensor_context(
                    instance=instance,
                    cursor=cursor,
                    resources={"backup_engine": BackupEngineResource()},
                )
                result = sensor(context)
                return result.cursor

            first = tick(None)
            second = tick(first)
            hooks.wait_for(1)
            bodies = hooks.bodies("/hook")
            assert len(bodies) == 1, bodies
            assert bodies[0]["target"] == "bad"
            assert "minute field '61'" in bodies[0]["message"]

            document["targets"]["bad"]["schedules"]["backup"] = "30 1 * * *"
            broken_project.write_text(yaml.safe_dump(document))
            tick(second)
            hooks.wait_for(2)
            bodies = hooks.bodies("/hook")
            assert len(bodies) == 2 and bodies[1]["status"] == "resolved"
            assert bodies[1]["target"] == "bad"


@pytest.mark.slow
def test_unusable_file_is_one_clear_error_for_the_code_location(tmp_path: Path) -> None:
    """A file that cannot be read at all has no healthy target to keep: one clear error."""
    path = write(tmp_path, "backup_root: b\ntargets:\n  a: {dsn_env: A}\n  a: {dsn_env: B}\n")
    result = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BACKUP_PIPELINES_CONFIG": str(path)},
    )
    assert result.returncode != 0
    assert "duplicate key 'a' at line 4 (first at line 3)" in result.stdout + result.stderr
