"""Point-in-time recovery on real clusters: archive_command is our wal-push (run by the server's
OS user), restore_command our wal-fetch, and the restored server must hold exactly the rows that
existed at the chosen moment."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.backup.base_reader import verify_base_backup
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.pitr.health import archive_health
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.window import PitrRangeError, parse_target_time, recovery_window
from backup_pipelines.engine.wal import wal_archive_for
from backup_pipelines_tests.pitr_support import PASSWORD, PitrSetup, start_pitr_cluster


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> PitrSetup:
    pitr = start_pitr_cluster(monkeypatch)
    yield pitr  # type: ignore[misc]
    pitr.close()


def _restored(setup: PitrSetup, data_dir: Path, port: int) -> LocalCluster:
    return LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)


@pytest.mark.postgres
def test_round_trip_restores_exactly_the_rows_before_the_target(
    setup: PitrSetup, tmp_path: Path
) -> None:
    setup.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    with pytest.raises(PitrRangeError, match="no base backup yet"):
        pitr_restore(
            setup.config, setup.target, parse_target_time("2026-01-01 00:00:00"), tmp_path / "x"
        )
    artifact = run_base_backup(setup.target)
    meta = artifact.meta
    assert meta.kind == "base" and meta.timeline == 1  # type: ignore[attr-defined]
    assert meta.first_wal_segment.startswith("00000001")  # type: ignore[attr-defined]
    assert meta.server_version_num >= 150000
    outcomes = {o.name: o for o in verify_base_backup(artifact, setup.target)}
    assert outcomes["checksum"].passed and outcomes["manifest"].passed, outcomes

    setup.sql("INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 500) g")
    time.sleep(0.2)
    target_time = parse_target_time(setup.sql("SELECT clock_timestamp()"))
    time.sleep(0.2)
    setup.sql("INSERT INTO orders SELECT g, 'after' FROM generate_series(501, 800) g")
    setup.sql("DELETE FROM orders WHERE id <= 100")  # the mistake PITR undoes
    setup.switch_and_wait()

    port = free_port()
    data_dir = setup.workdir / "restored" / "data"
    result = pitr_restore(setup.config, setup.target, target_time, data_dir, port=port, start=True)
    restored = _restored(setup, data_dir, port)
    try:
        assert result.promoted
        assert restored.psql("SELECT pg_is_in_recovery()") == "f"
        assert restored.psql("SELECT count(*), min(id), max(id) FROM orders") == "500|1|500"
        assert restored.psql("SELECT count(*) FROM orders WHERE note = 'after'") == "0"
        restored.psql("INSERT INTO orders VALUES (9999, 'written after promotion')")
        assert restored.psql("SELECT count(*) FROM orders") == "501"
        assert result.reached is not None and result.reached <= target_time
        assert result.timeline == 2
        assert (data_dir / "recovery.signal").exists() is False
        assert not (data_dir / "recovery.conf").exists()
        assert oct(data_dir.stat().st_mode & 0o777) == "0o700"
        auto_conf = (data_dir / "postgresql.auto.conf").read_text()
        assert "recovery_target_action = 'promote'" in auto_conf
        assert "wal-fetch --target main %f %p" in auto_conf
        assert "archive_mode = 'off'" in auto_conf
    finally:
        restored.pg_ctl("-m", "immediate", "stop")
    # The source is untouched.
    assert setup.sql("SELECT count(*) FROM orders") == "700"

    # Moments outside the recoverable window are refused with the window; so is a used folder.
    window = recovery_window(setup.target, wal_archive_for(setup.target))
    assert window.earliest is not None and window.latest is not None
    with pytest.raises(PitrRangeError, match="recoverable range is") as caught:
        pitr_restore(
            setup.config, setup.target, window.earliest - timedelta(hours=1), tmp_path / "early"
        )
    assert window.earliest.isoformat(sep=" ", timespec="seconds")[:19] in caught.value.message
    with pytest.raises(PitrRangeError, match="recoverable range is"):
        pitr_restore(
            setup.config, setup.target, window.latest + timedelta(hours=1), tmp_path / "late"
        )
    assert not (tmp_path / "early").exists() and not (tmp_path / "late").exists()
    with pytest.raises(ConfigError, match="not empty"):
        pitr_restore(setup.config, setup.target, window.latest, data_dir)
    assert (data_dir / "PG_VERSION").exists()


@pytest.mark.postgres
def test_failing_archiving_shows_as_lag_and_failures_never_as_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = start_pitr_cluster(monkeypatch, pitr={"archive_lag_limit_minutes": 0.02})
    try:
        setup.sql("SELECT txid_current()")
        first = setup.switch_and_wait()
        assert archive_health(setup.target).healthy
        assert setup.archive_dir is not None
        setup.archive_dir.chmod(0o500)  # the archive volume turns read-only for the server
        for _ in range(2):
            setup.sql("SELECT txid_current()")
            setup.sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 30
        while setup.sql("SELECT failed_count FROM pg_stat_archiver") == "0":
            assert time.monotonic() < deadline, "the archiver never reported a failure"
            time.sleep(0.2)
        time.sleep(1.5)  # older than the 1.2 s lag limit
        health = archive_health(setup.target)
        assert not health.healthy
        assert health.newest_segment == first
        assert health.unarchived_segments is not None and health.unarchived_segments >= 1
        assert any("archive_command is failing" in p for p in health.problems)
        assert any("archive lag" in p for p in health.problems)
        log = (setup.cluster.root / "server.log").read_text(errors="replace")
        assert "wal-push FAILED" in log and "not writable" in log
        assert "archive command failed with exit code 1" in log
        assert "terminated by signal" not in log and "exit code 12" not in log
        assert not list(setup.archive_dir.rglob("*.partial"))

        setup.archive_dir.chmod(0o700)  # fixed: the archiver catches up by itself
        setup.sql("SELECT txid_current()")
        setup.switch_and_wait()
        assert archive_health(setup.target).healthy
    finally:
        setup.close()


@pytest.mark.postgres
def test_unlogged_tables_come_back_empty_while_logged_tables_are_intact(
    setup: PitrSetup,
) -> None:
    """What the README promises: an unlogged table's rows are never in WAL nor in a base backup,
    so PITR brings the table back without its rows; logged tables are exact."""
    setup.sql("CREATE TABLE kept (id int PRIMARY KEY)")
    setup.sql("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)")
    setup.sql("INSERT INTO kept SELECT generate_series(1, 100)")
    setup.sql("INSERT INTO scratch SELECT generate_series(1, 100)")
    run_base_backup(setup.target)
    setup.sql("INSERT INTO kept SELECT generate_series(101, 150)")
    setup.sql("INSERT INTO scratch SELECT generate_series(101, 150)")
    time.sleep(0.2)
    target_time = parse_target_time(setup.sql("SELECT clock_timestamp()"))
    time.sleep(0.2)
    setup.sql("INSERT INTO kept SELECT generate_series(151, 200)")
    setup.switch_and_wait()
    assert setup.sql("SELECT count(*) FROM scratch") == "150"  # the source has them

    port = free_port()
    data_dir = setup.workdir / "restored" / "data"
    result = pitr_restore(setup.config, setup.target, target_time, data_dir, port=port, start=True)
    restored = _restored(setup, data_dir, port)
    try:
        assert result.promoted
        assert restored.psql("SELECT count(*), max(id) FROM kept") == "150|150"
        assert restored.psql("SELECT relpersistence FROM pg_class WHERE relname = 'scratch'") == "u"
        assert restored.psql("SELECT count(*) FROM scratch") == "0"
    finally:
        restored.pg_ctl("-m", "immediate", "stop")
