"""The PITR commands as an operator runs them during an outage: wal-setup, base-backup,
wal-status, pitr-restore (with its refusals)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines_tests.pitr_support import PASSWORD, TARGET, PitrSetup, start_pitr_cluster


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[PitrSetup]:
    # Base backups follow the target's encryption, like its logical backups.
    pitr = start_pitr_cluster(
        monkeypatch,
        target={"encryption": {"mode": "passphrase", "passphrase_env": "PITR_TEST_PASSPHRASE"}},
        env={"PITR_TEST_PASSPHRASE": "correct horse battery staple pitr"},
    )
    yield pitr
    pitr.close()


@pytest.mark.postgres
def test_operator_flow_base_backup_status_and_restore(setup: PitrSetup, run_cli) -> None:  # type: ignore[no-untyped-def]
    shown = run_cli("wal-setup", TARGET, "--archive-timeout", "30")
    assert shown.returncode == 0, shown.stderr
    assert "wal_level = replica" in shown.stdout
    assert "archive_mode = on" in shown.stdout
    assert f"wal-push --target {TARGET} %p'" in shown.stdout
    assert "archive_timeout = 30s" in shown.stdout

    setup.sql("CREATE TABLE ledger (id int, amount int)")
    backup = run_cli("base-backup", TARGET)
    assert backup.returncode == 0, backup.stderr
    assert "manifest: ok" in backup.stdout and "checksum: ok" in backup.stdout
    [stored] = (setup.workdir / "backups" / TARGET / "base").glob("base_*.tar.zst.gpg")
    meta = json.loads(stored.with_name(stored.name + ".meta").read_text())
    assert meta["encryption"]["mode"] == "passphrase"
    assert b"PG_VERSION" not in stored.read_bytes()
    assert PASSWORD not in backup.stdout + backup.stderr

    setup.sql("INSERT INTO ledger SELECT g, g * 10 FROM generate_series(1, 40) g")
    time.sleep(0.2)
    moment = setup.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    )
    time.sleep(0.2)
    setup.sql("UPDATE ledger SET amount = 0")  # the accident
    setup.switch_and_wait()

    status = run_cli("wal-status", TARGET, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] is True and report["gaps"] == []
    assert report["archiver"]["failed_count"] == 0

    late = run_cli(
        "pitr-restore",
        TARGET,
        "--to",
        "2099-01-01 00:00:00",
        "--data-dir",
        str(setup.workdir / "late"),
    )
    assert late.returncode == 2
    assert "recoverable range is" in late.stderr
    assert not (setup.workdir / "late").exists()

    port = free_port()
    data_dir = setup.workdir / "cli-restore" / "data"
    restored = run_cli(
        "pitr-restore",
        TARGET,
        "--to",
        moment,
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--start",
    )
    copy = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
    try:
        assert restored.returncode == 0, restored.stderr
        assert "promoted, accepting writes" in restored.stdout
        assert copy.psql("SELECT count(*), sum(amount) FROM ledger") == "40|8200"
    finally:
        copy.pg_ctl("-m", "immediate", "stop")

    again = run_cli("pitr-restore", TARGET, "--to", moment, "--data-dir", str(data_dir))
    assert again.returncode == 2
    assert "is not empty" in again.stderr
