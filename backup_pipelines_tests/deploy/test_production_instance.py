"""deploy/dagster.production.yaml against a real PostgreSQL: the real dagster-daemon dequeues a
launched backup run (queued run coordinator), runs it, and everything lands in PostgreSQL.
Also: the systemd units parse and point at real commands, and local dev needs no database."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.lib.run_coordinator import TargetTaggingRunCoordinator
from backup_pipelines_tests.conftest import DB_PASSWORD, REPO_ROOT, VENV_BIN
from backup_pipelines_tests.deploy.daemon_support import (
    DEPLOY,
    WORKSPACE,
    background,
    production_instance,
    wait_for,
)

SCHEDULE_TAG = "dagster/schedule_name"
EVERY_MINUTE = "cron_x_x_x_x_x_backup_schedule"


@pytest.mark.daemon
@pytest.mark.timeout(1200)
def test_production_instance_on_postgres_runs_a_queued_backup(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every minute, so the daemon's scheduler fires during the test (RUNNING by default).
    config = make_project(
        {"app": {"dsn_env": "DB_APP", "schedules": {"backup": "* * * * *"}}},
        env={"DB_APP": pg.dsn(sample_db)},
    )
    daemon_log = tmp_path / "daemon.log"
    with (
        production_instance(pg, tmp_path, monkeypatch) as production,
        background(
            [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
            production.env,
            daemon_log,
        ) as daemon,
    ):
        # Two runs for the same database, launched at once: the queue must run them one by one.
        command = [
            str(VENV_BIN / "dagster"),
            "job",
            "launch",
            "-w",
            str(WORKSPACE),
            "-j",
            "logical_backups",
            "--tags",
            '{"backup_pipelines/target": "app"}',
        ]
        launches = [
            subprocess.Popen(
                command,
                env=production.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        for launch in launches:
            output, _ = launch.communicate(timeout=180)
            assert launch.returncode == 0, output

        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert isinstance(instance.run_coordinator, TargetTaggingRunCoordinator)
            terminal = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)

            def backup_runs() -> list[dg.RunRecord]:
                # Other areas' sensors may start runs of their own (offsite copies): ignore them.
                records = instance.get_run_records(dg.RunsFilter(job_name="logical_backups"))
                return sorted(records, key=lambda r: r.start_time or float("inf"))

            def finished() -> list[dg.RunRecord] | None:
                manual = [r for r in backup_runs() if SCHEDULE_TAG not in r.dagster_run.tags]
                if len(manual) == 2 and all(r.dagster_run.status in terminal for r in manual):
                    return manual
                return None

            records = wait_for(
                # Every step is a process of its own (multiprocess executor): minutes while the
                # other test workers keep both cores busy.
                finished,
                480,
                "the daemon to dequeue and finish both runs",
                daemon,
                daemon_log,
            )
            assert [r.dagster_run.status for r in records] == [dg.DagsterRunStatus.SUCCESS] * 2, (
                daemon_log.read_text()[-4000:]
            )
            # Never at the same time: the second started after the first ended.
            assert records[0].end_time <= records[1].start_time
            run = records[1].dagster_run
            assert run.tags["backup_pipelines/target"] == "app"
            materialization = instance.get_latest_materialization_event(
                dg.AssetKey(["app", "logical_backup"])
            )
            assert materialization is not None and materialization.run_id == run.run_id
            backup = Path(str(materialization.asset_materialization.metadata["path"].value))
            assert backup.exists() and backup.parent == config.target("app").backup_dir
            # The run went through the queue, and its history is in PostgreSQL, not in DAGSTER_HOME.
            events = {
                r.event_log_entry.dagster_event_type
                for r in instance.get_records_for_run(run.run_id).records
            }
            assert dg.DagsterEventType.RUN_ENQUEUED in events
            assert dg.DagsterEventType.ASSET_CHECK_EVALUATION in events
            stored = pg.psql(
                f"SELECT status FROM runs WHERE run_id = '{run.run_id}'",
                dbname=production.dagster_db,
            )
            assert stored == "SUCCESS"

            # The schedule fired by itself, with the tags the concurrency limits use.
            def scheduled() -> dg.DagsterRun | None:
                for record in backup_runs():
                    run = record.dagster_run
                    if run.tags.get(SCHEDULE_TAG) == EVERY_MINUTE and run.status in terminal:
                        return run
                return None

            tick_run = wait_for(scheduled, 180, "a run started by the schedule", daemon, daemon_log)
            assert tick_run.status == dg.DagsterRunStatus.SUCCESS
            assert tick_run.tags["backup_pipelines/target"] == "app"
            assert tick_run.tags["backup_pipelines/db_host"] == f"127.0.0.1:{pg.port}"
            # No two backups of the database ever overlapped, whoever started them.
            done = [r for r in backup_runs() if r.end_time is not None]
            assert len(done) >= 3
            for earlier, later in zip(done, done[1:], strict=False):
                assert earlier.end_time <= later.start_time
            # The daemon also evaluates the sensors against this instance.
            wait_for(
                lambda: (
                    pg.psql("SELECT count(*) FROM job_ticks", dbname=production.dagster_db)
                    not in ("", "0")
                ),
                120,
                "a sensor tick stored in PostgreSQL",
                daemon,
                daemon_log,
            )
        home = production.home
        assert not any(home.glob("**/*.db")), "production state must not fall back to SQLite"
        assert DB_PASSWORD not in daemon_log.read_text()


def test_production_yaml_settings() -> None:
    settings = yaml.safe_load((DEPLOY / "dagster.production.yaml").read_text())
    db = settings["storage"]["postgres"]["postgres_db"]
    assert db["scheme"] == "postgresql+psycopg2"
    assert all(
        isinstance(db[k], dict) and "env" in db[k]
        for k in ("hostname", "username", "password", "db_name")
    )
    assert "config" not in settings["run_coordinator"], "limits belong in the concurrency block"
    limits = settings["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {
        "key": "backup_pipelines/target",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in limits
    assert settings["concurrency"]["pools"]["default_limit"] >= 1
    assert settings["run_monitoring"]["enabled"] is True
    assert settings["retention"]["schedule"]["purge_after_days"] == 30
    assert settings["retention"]["sensor"]["purge_after_days"]["success"] == 30


@pytest.mark.slow
def test_local_dev_instance_needs_no_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(REPO_ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert isinstance(instance.run_coordinator, TargetTaggingRunCoordinator)
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["dagster-webserver.service", "dagster-daemon.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "EnvironmentFile=/etc/backup-pipelines/backup-pipelines.env" in text
    assert "deploy/workspace.yaml" in text
    # Check the unit as installed at /opt/backup_pipelines, with this checkout standing in for it.
    local = (
        text.replace("/opt/backup_pipelines", str(REPO_ROOT))
        .replace("User=dagster", "User=root")
        .replace("Group=dagster", "Group=root")
        .replace("-g dagster", "-g root")
    )
    (tmp_path / unit).write_text(local)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    command = next(line for line in local.splitlines() if line.startswith("ExecStart="))
    binary = command.split("=", 1)[1].split()[0]
    assert subprocess.run([binary, "--help"], capture_output=True, timeout=120).returncode == 0
