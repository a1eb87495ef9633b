"""Fault matrix, point-in-time recovery: the restored server cannot start or cannot finish.

A port something already listens on is refused before anything is extracted (exit 2); when the
started server dies, the message carries the server's own FATAL reason (not a generic timeout)
and says what is left on disk. The CLI, the Dagster ``pitr_restore`` job and the PITR drill
report the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import free_port
from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.wal import list_wal, wal_archive_for
from backup_pipelines_tests.fault_matrix.support import (
    EXIT_FAILED,
    EXIT_REFUSED,
    assert_clear_failure,
    assert_clear_message,
    listening_port,
)
from backup_pipelines_tests.pitr_support import TARGET, PitrSetup, start_pitr_cluster


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[PitrSetup]:
    pitr = start_pitr_cluster(monkeypatch)
    yield pitr
    pitr.close()


def _recoverable_moment(setup: PitrSetup) -> str:
    """A base backup, rows, a moment to recover to, more rows; all WAL archived."""
    run_base_backup(setup.target)
    setup.sql("CREATE TABLE ledger (id int, amount int)")
    setup.sql("INSERT INTO ledger SELECT g, g FROM generate_series(1, 50) g")
    time.sleep(0.1)
    moment = setup.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    )
    time.sleep(0.1)
    setup.sql("UPDATE ledger SET amount = 0")
    setup.switch_and_wait()
    return moment


def _pitr_job_failure(data_dir: Path, moment: str, port: int) -> str:
    from backup_pipelines.defs.pitr.jobs import pitr_restore_job
    from backup_pipelines.defs.resources import BackupEngineResource

    job = dg.Definitions(
        jobs=[pitr_restore_job], resources={"backup_engine": BackupEngineResource()}
    ).resolve_job_def("pitr_restore")
    with dg.instance_for_test() as instance:
        run = job.execute_in_process(
            run_config={
                "ops": {
                    "restore_to_time": {
                        "config": {
                            "target": TARGET,
                            "to": moment,
                            "data_dir": str(data_dir),
                            "port": port,
                            "start": True,
                        }
                    }
                }
            },
            instance=instance,
            raise_on_error=False,
        )
    assert not run.success
    [failure] = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error  # type: ignore[union-attr]
    return str(error.message)


@pytest.mark.postgres
def test_busy_port_is_refused_before_anything_is_extracted(setup: PitrSetup, cli) -> None:  # type: ignore[no-untyped-def]
    moment = _recoverable_moment(setup)
    data_dir = setup.workdir / "restored" / "data"
    with listening_port() as busy:
        clock = time.monotonic()
        refused = cli(
            "pitr-restore", TARGET, "--to", moment, "--data-dir", str(data_dir),
            "--port", str(busy), "--start",
        )  # fmt: skip
        record = assert_clear_failure(refused, EXIT_REFUSED, f"port {busy}", "already in use")
        assert "1800s" not in record and "archiv" not in record
        assert time.monotonic() - clock < 30
        assert not data_dir.exists() and not data_dir.parent.exists()

        # The Dagster job says the same.
        message = _pitr_job_failure(data_dir, moment, busy)
        assert_clear_message(message, f"port {busy}", "already in use")
        assert not data_dir.exists()

    # Without --port the copy would listen on the port in the backed-up postgresql.conf: the
    # source's own, which is busy on this host. Refused too, and the extracted copy is removed.
    refused = cli("pitr-restore", TARGET, "--to", moment, "--data-dir", str(data_dir), "--start")
    assert_clear_failure(
        refused, EXIT_REFUSED, f"port {setup.cluster.port}", "already in use", "--port"
    )
    assert not data_dir.exists()

    # A free port works, and the source is untouched by all of this.
    assert setup.sql("SELECT count(*), sum(amount) FROM ledger") == "50|0"


@pytest.mark.postgres
def test_server_failing_during_recovery_reports_its_own_reason(setup: PitrSetup, cli) -> None:  # type: ignore[no-untyped-def]
    moment = _recoverable_moment(setup)
    # One more archived segment after the moment, then the segment holding the moment goes
    # missing: the window still covers the moment, but recovery cannot get there.
    setup.sql("INSERT INTO ledger VALUES (51, 51)")
    setup.switch_and_wait()
    archive = wal_archive_for(setup.target)
    segments = sorted(e.name for e in list_wal(archive) if e.kind == "segment")
    for name in segments[-2:-1]:
        archive.primary.delete(name)

    data_dir = setup.workdir / "restored" / "data"
    port = free_port()
    clock = time.monotonic()
    failed = cli(
        "pitr-restore", TARGET, "--to", moment, "--data-dir", str(data_dir),
        "--port", str(port), "--start",
    )  # fmt: skip
    record = assert_clear_failure(
        failed,
        EXIT_FAILED,
        "FATAL",
        "recovery ended before configured recovery target was reached",
        str(data_dir),
        "safe to delete",
    )
    assert "within 1800s" not in record
    assert time.monotonic() - clock < 120
    # What the message says is left: the copy, stopped, with its log.
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()
    assert (data_dir / "pitr_restore.log").exists()
    assert setup.sql("SELECT count(*) FROM ledger") == "51"


@pytest.mark.postgres
def test_pitr_drill_on_a_busy_drill_port_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through Dagster: the drill asset records the reason, its check fails with it."""
    from backup_pipelines.defs.pitr import assets, checks
    from backup_pipelines.defs.resources import BackupEngineResource

    with listening_port() as busy:
        drill_dir = tmp_path / "drills"
        setup = start_pitr_cluster(
            monkeypatch, pitr={"drill_port": busy, "drill_dir": str(drill_dir)}
        )
        try:
            run_base_backup(setup.target)
            drill_key = dg.AssetKey([TARGET, "pitr_drill"])
            [drill] = [
                a
                for a in assets.pitr_assets().assets or []
                if isinstance(a, dg.AssetsDefinition) and drill_key in a.keys
            ]
            [check] = [
                c
                for c in checks.pitr_checks().asset_checks or []
                if "pitr_drill_passed" in str(c.check_keys)
            ]
            with dg.instance_for_test() as instance:
                result = dg.materialize(
                    [drill, check],
                    instance=instance,
                    resources={"backup_engine": BackupEngineResource()},
                    raise_on_error=False,
                )
            [materialized] = result.get_asset_materialization_events()
            recorded = materialized.materialization.metadata
            assert recorded["passed"].value is False
            message = str(recorded["result"].value)
            assert_clear_message(message, f"port {busy}", "already in use", "drill_port")
            assert "1800" not in message
            [evaluation] = result.get_asset_check_evaluations()
            assert not evaluation.passed
            assert evaluation.metadata["result"].value == message
            assert list(drill_dir.iterdir()) == []  # the drill removed its scratch folder
        finally:
            setup.close()


def test_failure_reason_is_the_servers_own_line() -> None:
    """The lines PostgreSQL 15 writes when its port is taken (copied from a real start), with a
    client's FATAL in between that is not the reason."""
    from backup_pipelines.engine.pitr.server import server_failure_reason

    log = [
        "2026-11-29 03:35:05.053 UTC [13648] LOG:  starting PostgreSQL 15.18 (Debian 15.18-0+deb12u1)",
        '2026-11-29 03:35:05.053 UTC [13648] LOG:  could not bind IPv4 address "127.0.0.1": '
        "Address already in use",
        "2026-11-29 03:35:05.053 UTC [13648] HINT:  Is another postmaster already running on "
        "port 43321? If not, wait a few seconds and retry.",
        '2026-11-29 03:35:05.053 UTC [13648] WARNING:  could not create listen socket for "127.0.0.1"',
        "2026-11-29 03:35:05.053 UTC [13648] FATAL:  could not create any TCP/IP sockets",
        "2026-11-29 03:35:05.054 UTC [13650] FATAL:  the database system is shutting down",
        "2026-11-29 03:35:05.055 UTC [13648] LOG:  database system is shut down",
    ]
    assert server_failure_reason(log) == (
        "FATAL: could not create any TCP/IP sockets "
        '(could not bind IPv4 address "127.0.0.1": Address already in use)'
    )
    assert server_failure_reason(
        [], "pg_ctl: could not start server\nExamine the log output.\n"
    ) == ("pg_ctl: could not start server")
