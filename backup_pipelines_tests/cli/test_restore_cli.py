"""``backup-pipelines restore`` / ``drill`` / ``restore-cleanup`` run as an operator runs them."""

from __future__ import annotations

import logging
import os
import pty
import secrets
import signal
import subprocess
import time

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.offsite import upload_backup
from backup_pipelines.engine.restore.locate import configured_offsite_storage
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.conftest import DB_PASSWORD, VENV_BIN
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import (
    databases,
    forge_plain_backup,
    inject_before_first,
)

log = logging.getLogger("test")
CHANGE_SQL = "DELETE FROM scheduling.shift WHERE id % 5 = 0; UPDATE hr.employee SET notes = 'y'"


def _no_secret(result: subprocess.CompletedProcess[str]) -> None:
    assert DB_PASSWORD not in result.stdout and DB_PASSWORD not in result.stderr


@pytest.mark.parametrize(
    ("dump_format", "compression", "encrypted", "source"),
    [
        ("plain", "gzip", False, "path"),
        ("plain", "zstd", True, "latest"),
        ("custom", "zstd", True, "s3"),
    ],
)
def test_cli_restore_round_trip(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    run_cli,
    aws_env: str,
    dump_format: str,
    compression: str,
    encrypted: bool,
    source: str,
) -> None:
    settings: dict = {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}
    if encrypted:
        settings["encryption"] = {"mode": "passphrase", "passphrase_env": "BP_CLI_PASS"}
    if source == "s3":
        bucket = f"bp-cli-{secrets.token_hex(4)}"
        default_s3_client().create_bucket(Bucket=bucket)
        settings["offsite"] = {"bucket": bucket, "prefix": "pg"}
    passphrase = "cli passphrase " + secrets.token_hex(6)
    config = make_project(
        {"prod": settings}, env={"DB_PROD": pg.dsn(sample_db), "BP_CLI_PASS": passphrase}
    )
    backup = run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    location = {"path": str(backup.path), "latest": "latest"}.get(source)
    if source == "s3":
        storage = configured_offsite_storage(config.target("prod"))
        assert storage is not None
        location = upload_backup(backup, storage).url
    pg.psql(CHANGE_SQL, sample_db)

    result = run_cli("restore", location, "prod", "--confirm", "prod", "--progress-interval", "0")

    assert result.returncode == 0, result.stderr
    assert fingerprint(pg, sample_db) == at_backup
    assert "safety backup: " + str(config.target("prod").backup_dir) in result.stdout
    assert "previous database kept as: " in result.stdout
    assert "progress:" in result.stderr and "done" in result.stderr
    _no_secret(result)
    assert passphrase not in result.stdout + result.stderr
    previous = result.stdout.split("previous database kept as: ")[1].split()[0]
    pg.psql(f'DROP DATABASE "{previous}"')


def test_cli_refusals_exit_non_zero_and_touch_nothing(
    pg: LocalCluster, sample_db: str, make_project, cli, tmp_path
) -> None:
    other = f"{sample_db}_other"
    pg.psql(f'CREATE DATABASE "{other}" TEMPLATE "{sample_db}"')
    try:
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD"}, "other": {"dsn_env": "DB_OTHER"}},
            env={"DB_PROD": pg.dsn(sample_db), "DB_OTHER": pg.dsn(other)},
        )
        backup = run_backup(config.target("prod"), log=log)
        foreign = run_backup(config.target("other"), log=log)
        corrupt = forge_plain_backup(backup, lambda dump: dump)
        data = bytearray(corrupt.read_bytes())
        data[100] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        stray = tmp_path / backup.path.name
        stray.write_bytes(backup.path.read_bytes())
        pg.psql(CHANGE_SQL, sample_db)
        before_fp, before_dbs = fingerprint(pg, sample_db), databases(pg)

        cases = [
            ((str(backup.path), "prod"), 2, "without confirmation"),
            ((str(backup.path), "prod", "--confirm", "production"), 2, "does not match"),
            ((str(corrupt), "prod", "--confirm", "prod"), 1, "failed at step 'verify'"),
            ((str(foreign.path), "prod", "--confirm", "prod"), 2, f"backup of database '{other}'"),
            ((str(stray), "prod", "--confirm", "prod"), 2, "outside the backup root"),
            ((str(backup.path), "nope", "--confirm", "nope"), 2, "unknown target 'nope'"),
        ]
        for args, code, message in cases:
            result = cli("restore", *args, input="")
            assert result.returncode == code, (args, result.stderr)
            assert message in result.stderr, (args, result.stderr)
            assert "What to do:" in result.stderr
            _no_secret(result)
            assert fingerprint(pg, sample_db) == before_fp and databases(pg) == before_dbs
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def _restore_on_tty(answer: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    """Run restore with a real terminal on stdin, typing ``answer`` at the prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), "restore", *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    os.close(slave)
    try:
        os.write(master, answer)
        out, err = proc.communicate(timeout=180)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_cli_asks_for_the_target_name_on_a_terminal(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup = run_backup(config.target("prod"), log=log)
    at_backup = fingerprint(pg, sample_db)
    pg.psql(CHANGE_SQL, sample_db)
    changed = fingerprint(pg, sample_db)

    wrong = _restore_on_tty(b"production\n", str(backup.path), "prod")
    assert wrong.returncode == 2 and "does not match" in wrong.stderr
    assert "Type the target name (prod)" in wrong.stdout
    assert f"replace database '{sample_db}'" in wrong.stdout
    assert fingerprint(pg, sample_db) == changed

    right = _restore_on_tty(b"prod\n", str(backup.path), "prod")
    assert right.returncode == 0, right.stderr
    assert fingerprint(pg, sample_db) == at_backup
    previous = right.stdout.split("previous database kept as: ")[1].split()[0]
    pg.psql(f'DROP DATABASE "{previous}"')


def test_cli_drill_and_restore_cleanup(
    pg: LocalCluster, sample_db: str, make_project, run_cli
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "restore": {"drop_previous_after_hours": 0.0002}}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    backup = run_backup(config.target("prod"), log=log)
    before_dbs = databases(pg)

    drill = run_cli("drill", "prod")
    assert drill.returncode == 0, drill.stderr
    assert "restore drill passed" in drill.stdout and "within the target of 3600s" in drill.stdout
    assert databases(pg) == before_dbs

    restore = run_cli("restore", "latest", "prod", "--confirm", "prod")
    assert restore.returncode == 0, restore.stderr
    previous = restore.stdout.split("previous database kept as: ")[1].split()[0]
    assert previous in databases(pg)
    time.sleep(1.0)  # the grace period is 0.72 s
    cleanup = run_cli("restore-cleanup", "prod")
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"dropped {previous}" in cleanup.stdout
    assert previous not in databases(pg)

    forge_plain_backup(
        backup, inject_before_first(b"CREATE TABLE", b"SELECT 1/0;\n"), suffix_seconds=30
    )
    broken = run_cli("drill", "prod")
    assert broken.returncode == 1
    assert "FAILED at step 'restore'" in broken.stdout and "division by zero" in broken.stdout


def test_killed_restore_leaves_live_database_intact_and_next_restore_cleans_up(
    pg: LocalCluster, sample_db: str, make_project, run_cli
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup = run_backup(config.target("prod"), log=log)
    slow = forge_plain_backup(
        backup, inject_before_first(b"CREATE TABLE scheduling.shift", b"SELECT pg_sleep(2);\n")
    )
    pg.psql(CHANGE_SQL, sample_db)
    before_fp = fingerprint(pg, sample_db)

    proc = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), "restore", str(slow), "prod", "--confirm", "prod"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "pg_sleep" not in pg.psql(
            "SELECT string_agg(query, ' ') FROM pg_stat_activity WHERE datname LIKE '%restoring%'"
        ):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the host dies mid-restore: CLI and psql at once
        proc.wait()

    leftovers = [name for name in databases(pg) if "_restoring_" in name]
    assert len(leftovers) == 1
    assert fingerprint(pg, sample_db) == before_fp
    deadline = time.monotonic() + 30
    while pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{leftovers[0]}'") != "0":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    again = run_cli("restore", str(backup.path), "prod", "--confirm", "prod")
    assert again.returncode == 0, again.stderr
    assert f"Dropped {leftovers[0]}, left behind by an interrupted run" in again.stderr
    assert not [name for name in databases(pg) if "_restoring_" in name]
    previous = again.stdout.split("previous database kept as: ")[1].split()[0]
    pg.psql(f'DROP DATABASE "{previous}"')
