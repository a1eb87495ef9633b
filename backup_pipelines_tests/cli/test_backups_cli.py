"""The CLI as an operator uses it: backup (with --test), verify, list, check-config."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines_tests.conftest import DB_PASSWORD


def test_backup_with_test_then_list_and_verify(
    pg: LocalCluster, sample_db: str, make_project, run_cli
) -> None:
    config = make_project(
        {"production": {"dsn_env": "DATABASE_URL_PRODUCTION"}},
        env={"DATABASE_URL_PRODUCTION": pg.dsn(sample_db)},
    )
    result = run_cli("backup", "production", "--test")
    assert result.returncode == 0, result.stderr
    assert "restore test passed" in result.stdout
    assert "checksum: ok" in result.stdout and "readable: ok" in result.stdout

    backups = sorted(config.target("production").backup_dir.glob("*.sql.gz"))
    assert len(backups) == 1
    meta = json.loads(Path(f"{backups[0]}.meta").read_text())
    assert meta["verification"]["passed"] is True
    assert set(meta["verification"]["checks"]) == {
        "checksum",
        "readable",
        "globals",
        "restore_test",
    }

    time.sleep(1.1)
    second = run_cli("backup", "production")
    assert second.returncode == 0, second.stderr
    listing = run_cli("list", "production")
    assert listing.returncode == 0
    lines = [line for line in listing.stdout.splitlines() if line.startswith(sample_db)]
    assert len(lines) == 2
    newest, oldest = lines
    assert newest.split()[0] > oldest.split()[0]  # newest first
    assert "verified" in newest and "verified" in oldest

    verify = run_cli("verify", str(backups[0]))
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK")


def test_verify_fails_on_tampered_file(pg: LocalCluster, sample_db: str, make_project, cli) -> None:
    config = make_project({"production": {"dsn_env": "DB"}}, env={"DB": pg.dsn(sample_db)})
    assert cli("backup", "production").returncode == 0
    backup = next(config.target("production").backup_dir.glob("*.sql.gz"))
    with backup.open("r+b") as handle:
        handle.seek(200)
        handle.write(b"tampered")
    result = cli("verify", str(backup))
    assert result.returncode == 1
    assert "SHA-256 mismatch" in result.stderr
    assert "do not restore from this file" in result.stderr


def test_bad_config_and_missing_env_exit_2_with_the_field(tmp_path: Path, cli) -> None:
    config = tmp_path / "targets.yaml"
    config.write_text(
        "backup_root: b\ntargets:\n  production:\n    dsn_env: DB\n    compresion: gzip\n"
    )
    result = cli("--config", str(config), "backup", "production")
    assert result.returncode == 2
    assert "target 'production', field 'compresion': unknown key" in result.stderr

    config.write_text("backup_root: b\ntargets:\n  production:\n    dsn_env: DB_NOT_SET_ANYWHERE\n")
    result = cli("--config", str(config), "backup", "production")
    assert result.returncode == 2
    assert "environment variable DB_NOT_SET_ANYWHERE is not set" in result.stderr
    check = cli("--config", str(config), "check-config")
    assert check.returncode == 2 and "DB_NOT_SET_ANYWHERE" in check.stdout


def test_unreachable_database_exits_non_zero(tmp_path: Path, cli) -> None:
    config = tmp_path / "targets.yaml"
    config.write_text(f"backup_root: {tmp_path}/b\ntargets:\n  production:\n    dsn_env: DB\n")
    result = cli(
        "--config",
        str(config),
        "backup",
        "production",
        env={"DB": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/app"},
    )
    assert result.returncode == 1
    assert "cannot connect to app@127.0.0.1:1/app" in result.stderr
    assert DB_PASSWORD not in result.stderr + result.stdout


def test_password_never_appears_in_argv_logs_or_files(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    """Watch every process's argv during a backup; read the log file and every file written."""
    config = make_project({"production": {"dsn_env": "DB"}}, env={"DB": pg.dsn(sample_db)})
    assert DB_PASSWORD in os.environ["DB"]
    seen_argv: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    with contextlib.suppress(OSError):  # processes come and go
                        seen_argv.append(
                            (proc / "cmdline")
                            .read_bytes()
                            .replace(b"\0", b" ")
                            .decode(errors="replace")
                        )
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    log_file = tmp_path / "logs" / "backup.log"
    try:
        result = subprocess.run(
            [
                str(Path(os.sys.executable).parent / "backup-pipelines"),
                "--log-file",
                str(log_file),
                "-v",
                "backup",
                "production",
                "--test",
            ],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert any("pg_dump" in argv for argv in seen_argv), "the watcher never saw pg_dump running"
    assert not [argv for argv in seen_argv if DB_PASSWORD in argv]
    assert DB_PASSWORD not in result.stdout + result.stderr
    assert DB_PASSWORD not in log_file.read_text()
    for path in config.target("production").backup_dir.iterdir():
        if not path.name.endswith(".gz"):
            assert DB_PASSWORD not in path.read_text(errors="replace"), path


def test_directory_format_backup_test_list_json_and_bad_jobs(
    pg: LocalCluster, sample_db: str, make_project, cli, tmp_path: Path
) -> None:
    config = make_project(
        {"production": {"dsn_env": "DB", "format": "directory", "jobs": 2, "compression": "zstd"}},
        env={"DB": pg.dsn(sample_db)},
    )
    result = cli("backup", "production", "--test")
    assert result.returncode == 0, result.stderr
    assert "restore test passed" in result.stdout and "readable: ok" in result.stdout
    (backup,) = config.target("production").backup_dir.glob("*.dir.tar.zst")

    listing = cli("list", "production", "--json")
    assert listing.returncode == 0, listing.stderr
    (entry,) = json.loads(listing.stdout)
    assert entry["name"] == backup.name and entry["status"] == "verified", entry
    verify = cli("verify", str(backup))
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK")

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backup_root: b\ntargets:\n  production:\n    dsn_env: DB\n    format: custom\n    jobs: 4\n"
    )
    refused = cli("--config", str(bad), "backup", "production")
    assert refused.returncode == 2
    assert "jobs: 4 needs format: directory" in refused.stderr
    assert "Traceback" not in refused.stderr
