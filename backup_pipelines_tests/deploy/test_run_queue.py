"""A restore launched from the Launchpad waits in the queue for the running backup of its target,
and starts when that backup ends; a restore of another target is not held back.

Everything real: deploy/dagster.production.yaml on PostgreSQL, the dagster-daemon dequeuing, the
webserver receiving the launches through GraphQL (the call the Launchpad makes, with nothing but
the run config), pg_dump held on a table lock so the backup keeps running while we look."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster_graphql import DagsterGraphQLClient

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.lib.tags import TAG_DB_HOST, TAG_TARGET
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.deploy.daemon_support import (
    WORKSPACE,
    background,
    production_instance,
    wait_for,
)

TABLES = ("hr.employee", "scheduling.shift", "payroll.payslip")
RUN_FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
# Generous: the machines running the tests are small and busy.
SLOW = 300


def _counts(pg: LocalCluster, database: str) -> dict[str, str]:
    return {table: pg.psql(f"SELECT count(*) FROM {table}", dbname=database) for table in TABLES}


def _restore_config(target: str) -> dict:
    return {
        "ops": {
            "restore_from_backup": {
                "config": {"target": target, "backup": "latest", "confirm": target}
            }
        }
    }


@contextmanager
def _table_lock_holder(dsn: str) -> Iterator[psycopg.Connection]:
    """A session that can hold table locks in its open transaction until it is closed."""
    connection = psycopg.connect(dsn, autocommit=False)
    try:
        yield connection
    finally:
        connection.close()


def _code_location_loaded(port: int) -> Callable[[], bool]:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"

    def loaded() -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.load(response)
        except OSError:
            return False
        entries = body["data"]["workspaceOrError"].get("locationEntries") or []
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    return loaded


@pytest.mark.daemon
@pytest.mark.timeout(1200)
def test_a_launchpad_restore_queues_behind_the_running_backup_of_its_target(
    pg: LocalCluster,
    sample_db: str,
    make_project,  # type: ignore[no-untyped-def]
    run_cli,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    other_db = f"{sample_db}_other"
    create_sample_database(pg.dsn(), other_db, employees=40, shifts=200)
    request.addfinalizer(
        lambda: pg.psql(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)', check=False)
    )
    # No scheduled work in the way; the databases the restores replace are dropped at once.
    quiet = {"schedules": {"backup": "off", "restore_drill": "off"}}
    drop_replaced = {"restore": {"drop_previous_after_hours": 0}}
    make_project(
        {
            # pg_dump waits for the table lock as long as it takes (the backup keeps running).
            "app": {"dsn_env": "DB_APP", "lock_wait_timeout": "off", **quiet, **drop_replaced},
            "other": {"dsn_env": "DB_OTHER", **quiet, **drop_replaced},
        },
        env={"DB_APP": pg.dsn(sample_db), "DB_OTHER": pg.dsn(other_db)},
    )
    before = {"app": _counts(pg, sample_db), "other": _counts(pg, other_db)}
    taken = run_cli("backup", "other")  # what the restore of `other` restores
    assert taken.returncode == 0, taken.stderr

    port = free_port()
    # Starting a run makes the code server load the definitions in a new process before it
    # answers; on a small, busy test machine that can take longer than Dagster's 60 s default.
    monkeypatch.setenv("DAGSTER_GRPC_TIMEOUT_SECONDS", "300")
    with (
        production_instance(pg, tmp_path, monkeypatch) as production,
        background(
            [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
            production.env,
            tmp_path / "daemon.log",
        ) as daemon,
        background(
            [
                str(VENV_BIN / "dagster-webserver"),
                *("-h", "127.0.0.1", "-p", str(port), "-w", str(WORKSPACE)),
            ],
            production.env,
            tmp_path / "webserver.log",
        ) as webserver,
        dg.DagsterInstance.get() as instance,
        _table_lock_holder(pg.dsn(sample_db)) as blocker,
    ):
        wait_for(
            _code_location_loaded(port),
            SLOW,
            "the webserver to load the code location",
            webserver,
            tmp_path / "webserver.log",
        )
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)

        def status(run_id: str) -> dg.DagsterRunStatus:
            run = instance.get_run_by_id(run_id)
            assert run is not None
            return run.status

        def record(run_id: str) -> dg.RunRecord:
            (found,) = instance.get_run_records(dg.RunsFilter(run_ids=[run_id]))
            return found

        def finished(run_id: str) -> Callable[[], dg.RunRecord | None]:
            return lambda: record(run_id) if status(run_id) in RUN_FINISHED else None

        # A backup of app that keeps running: pg_dump waits behind this lock until we let go.
        blocker.execute("LOCK TABLE hr.employee IN ACCESS EXCLUSIVE MODE")
        backup_id = client.submit_job_execution(
            "logical_backups", asset_selection=[["app", "logical_backup"]]
        )
        wait_for(
            lambda: (
                pg.psql(
                    "SELECT count(*) FROM pg_stat_activity "
                    f"WHERE datname = '{sample_db}' AND wait_event_type = 'Lock'"
                )
                not in ("", "0")
            ),
            SLOW,
            "the backup of app to wait on the table lock",
            daemon,
            tmp_path / "daemon.log",
        )
        assert status(backup_id) == dg.DagsterRunStatus.STARTED

        # Launched like the Launchpad does: a job name and its run config, no tags.
        restore_app = client.submit_job_execution(
            "restore_database", run_config=_restore_config("app")
        )
        restore_other = client.submit_job_execution(
            "restore_database", run_config=_restore_config("other")
        )
        tags = instance.get_run_by_id(restore_app).tags  # type: ignore[union-attr]
        assert tags[TAG_TARGET] == "app" and tags[TAG_DB_HOST] == f"127.0.0.1:{pg.port}"

        # Another target's restore is not held back: the daemon starts it meanwhile ...
        wait_for(
            lambda: status(restore_other) != dg.DagsterRunStatus.QUEUED,
            SLOW,
            "the restore of other to leave the queue",
            daemon,
            tmp_path / "daemon.log",
        )
        # ... while app's restore waits in the queue for app's backup.
        assert status(backup_id) == dg.DagsterRunStatus.STARTED
        assert status(restore_app) == dg.DagsterRunStatus.QUEUED

        blocker.close()  # the lock goes, the backup goes on
        backup = wait_for(
            finished(backup_id), SLOW, "the backup of app", daemon, tmp_path / "daemon.log"
        )
        assert backup.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert backup.dagster_run.tags[TAG_TARGET] == "app"
        restored = wait_for(
            finished(restore_app), SLOW, "the restore of app", daemon, tmp_path / "daemon.log"
        )
        # It started once the backup had ended, and restored that backup: nothing was lost.
        assert restored.dagster_run.status == dg.DagsterRunStatus.SUCCESS, (
            tmp_path / "daemon.log"
        ).read_text()[-4000:]
        assert backup.end_time is not None and restored.start_time is not None
        assert restored.start_time >= backup.end_time
        materialized = instance.get_latest_materialization_event(
            dg.AssetKey(["app", "logical_backup"])
        )
        assert materialized is not None and materialized.asset_materialization is not None
        taken_by_the_backup = Path(str(materialized.asset_materialization.metadata["path"].value))
        outputs = instance.get_records_for_run(
            restore_app, of_type=dg.DagsterEventType.STEP_OUTPUT
        ).records
        (output,) = [r.event_log_entry.dagster_event for r in outputs]
        assert output is not None and output.step_output_data is not None
        restored_backup = str(output.step_output_data.metadata["backup"].value)
        assert taken_by_the_backup.name in restored_backup
        assert _counts(pg, sample_db) == before["app"]
        other = wait_for(
            finished(restore_other), SLOW, "the restore of other", daemon, tmp_path / "daemon.log"
        )
        assert other.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert other.dagster_run.tags[TAG_TARGET] == "other"
        assert other.start_time is not None and other.start_time < backup.end_time
        assert _counts(pg, other_db) == before["other"]
