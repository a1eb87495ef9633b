"""Point-in-time recovery of a Debian/Ubuntu cluster (postgresql-common): its postgresql.conf,
pg_hba.conf, pg_ident.conf and conf.d/ live in /etc/postgresql/<ver>/<name>/, outside the data
directory pg_basebackup copies. The base backup must carry them, and the restored copy must
start with them without touching the original cluster's files, sockets or port."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.backup.base_reader import verify_base_backup
from backup_pipelines.engine.backup.server_config import capture_server_config
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.drills.pitr import pitr_drill
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.window import parse_target_time
from backup_pipelines_tests.pitr_support import PASSWORD, DebianPitrSetup, start_debian_pitr_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def debian(monkeypatch: pytest.MonkeyPatch) -> Iterator[DebianPitrSetup]:
    setup = start_debian_pitr_cluster(monkeypatch)
    yield setup
    setup.close()


def test_base_backup_captures_the_configuration_outside_the_data_directory_and_restores_it(
    debian: DebianPitrSetup,
) -> None:
    assert not (debian.data_dir / "postgresql.conf").exists()  # the layout under test
    debian.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    artifact = run_base_backup(debian.target)
    meta = artifact.meta
    assert meta.data_directory == str(debian.data_dir)  # type: ignore[attr-defined]
    captured = {entry.path: entry for entry in meta.server_config}  # type: ignore[attr-defined]
    expected = {
        str(debian.etc_dir / name)
        for name in (
            "postgresql.conf",
            "pg_hba.conf",
            "pg_ident.conf",
            "conf.d/backup_pipelines.conf",
        )
    }
    assert set(captured) == expected, captured
    for path, entry in captured.items():
        data = Path(path).read_bytes()
        assert entry.size_bytes == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert {e.setting for e in captured.values()} == {
        "config_file", "hba_file", "ident_file", "include"
    }  # fmt: skip
    assert meta.server_config_missing == []  # type: ignore[attr-defined]
    # The extra tar members do not upset pg_verifybackup, and the file's checksum covers them.
    outcomes = {o.name: o for o in verify_base_backup(artifact, debian.target)}
    assert outcomes["checksum"].passed and outcomes["manifest"].passed, outcomes

    debian.sql("INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 300) g")
    time.sleep(0.2)
    target_time = parse_target_time(debian.sql("SELECT clock_timestamp()"))
    time.sleep(0.2)
    debian.sql("UPDATE orders SET note = 'after'")
    debian.sql("DELETE FROM orders WHERE id > 250")
    debian.switch_and_wait()

    port = free_port()
    data_dir = debian.workdir / "restored" / "data"
    result = pitr_restore(
        debian.config, debian.target, target_time, data_dir, port=port, start=True
    )
    restored = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
    try:
        assert result.promoted, result
        assert restored.psql("SELECT count(*), min(id), max(id) FROM orders") == "300|1|300"
        assert restored.psql("SELECT count(*) FROM orders WHERE note <> 'before'") == "0"
        # Every file the copy uses is its own: none of the original cluster's paths.
        shown = restored.psql(
            "SELECT name, setting FROM pg_settings "
            "WHERE name IN ('data_directory', 'config_file', 'hba_file', 'ident_file', "
            "'external_pid_file', 'unix_socket_directories', 'port', 'cluster_name')"
        )
        settings = dict(line.split("|", 1) for line in shown.splitlines())
        for name in ("data_directory", "config_file", "hba_file", "ident_file"):
            assert settings[name].startswith(str(data_dir)), (name, settings)
        assert settings["unix_socket_directories"] == str(data_dir)
        assert settings["port"] == str(port)
        originals = ("/etc/postgresql", "/var/lib/postgresql", "/var/run/postgresql", "/run/")
        assert not [v for v in settings.values() if v.startswith(originals)], settings
        assert settings.get("external_pid_file", "") == ""
        assert settings["cluster_name"] == "main pitr copy"
        # conf.d came back too: the archiving settings of the drop-in are in effect (and off).
        assert restored.psql("SHOW archive_mode") == "off"
        assert restored.psql("SHOW wal_level") == "replica"
        conf = (data_dir / "postgresql.conf").read_text()
        assert "# (commented out by backup-pipelines pitr-restore" in conf
        assert f"include_dir = '{data_dir}/restored_server_config/etc/postgresql/" in conf
    finally:
        restored.pg_ctl("-m", "immediate", "stop")
    # The original cluster kept running, on its own files and port, with its own rows.
    assert debian.sql("SELECT count(*) FROM orders") == "250"
    status = subprocess.run(
        ["pg_ctlcluster", str(debian.version), debian.name, "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0, status.stdout + status.stderr


def test_pitr_drill_passes_on_a_debian_cluster(debian: DebianPitrSetup) -> None:
    run_base_backup(debian.target)
    debian.sql("CREATE TABLE t AS SELECT generate_series(1, 10) AS id")
    result = pitr_drill(debian.config, debian.target)
    assert result.passed, result.message
    assert result.databases_checked >= 2
    assert debian.sql("SELECT count(*) FROM t") == "10"


def test_a_backup_role_that_cannot_see_the_configuration_is_told_what_to_grant(
    debian: DebianPitrSetup,
) -> None:
    """A REPLICATION-only role cannot see where the configuration lives: the capture says so
    (warning + .meta) instead of pretending; with pg_read_all_settings it finds every file."""
    role, password = "backup_only", "role-" + PASSWORD
    debian.sql(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'")
    info = ConnectionInfo.parse(
        f"postgresql://{role}:{password}@127.0.0.1:{debian.cluster.port}/postgres"
    )
    blind = capture_server_config(info)
    assert blind.files == [] and blind.data_directory is None
    assert any("pg_read_all_settings" in problem for problem in blind.missing)
    debian.sql(f"GRANT pg_read_all_settings TO {role}")
    seeing = capture_server_config(info)
    assert seeing.missing == []
    assert {f.path for f in seeing.files} >= {
        str(debian.etc_dir / "postgresql.conf"), str(debian.etc_dir / "pg_hba.conf")
    }  # fmt: skip
