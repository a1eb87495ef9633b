"""Fault matrix, bad operator input: options, targets, concurrent runs and missing secrets.

Every case runs the command line and asserts one clear line, no traceback, and the documented
exit status (README "Exit status"): 1 the operation failed, 2 bad configuration, usage or a
refusal. Most cases call its ``main()`` in the test process (``cli``); the installed command
runs where a process of its own is the point (another user, a lock held by another process)
and once for the entry point's exit status. The mapping itself lives in one place, ``engine/errors.py``; the first test pins it.
"""

from __future__ import annotations

import fcntl
import importlib
import pkgutil
import shutil
import tempfile
from pathlib import Path

import pytest

import backup_pipelines.engine
from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine import errors
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.fault_matrix.clear_errors import (
    assert_clear_error,
    assert_reported,
    run_as,
    second_os_user,
)

# Every engine error, by the exit status an operator gets for it.
REFUSALS = {
    "ConfigError",
    "FolderError",
    "EncryptionKeyError",
    "RefusedError",
    "TargetBusyError",
    "ConfirmationError",
    "RestoreRefusedError",
    "RollbackRefusedError",
    "PitrRangeError",
    "PitrPortInUseError",
    "RetentionRefusedError",
}


def _all_error_classes() -> dict[str, type[errors.BackupPipelinesError]]:
    for module in pkgutil.walk_packages(
        backup_pipelines.engine.__path__, "backup_pipelines.engine."
    ):
        importlib.import_module(module.name)
    found: dict[str, type[errors.BackupPipelinesError]] = {}
    pending = [errors.BackupPipelinesError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return found


def test_one_place_maps_every_engine_error_to_its_exit_status() -> None:
    classes = _all_error_classes()
    assert set(classes) >= REFUSALS
    for name, cls in classes.items():
        expected = errors.EXIT_REFUSED if name in REFUSALS else errors.EXIT_FAILED
        exc = cls.__new__(cls)
        assert errors.exit_code_for(exc) == expected, name
        # No class decides its own status: the property reads the central mapping.
        assert "exit_code" not in vars(cls) or cls is errors.BackupPipelinesError, name


# --- options ----------------------------------------------------------------------------------


def project(tmp_path: Path) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(f"backup_root: {tmp_path}/b\ntargets:\n  prod:\n    dsn_env: DB_PROD\n")
    return path


def test_log_file_in_a_missing_folder_is_created_private(tmp_path: Path, run_cli) -> None:
    log_file = tmp_path / "logs" / "nested" / "cron.log"
    result = run_cli(
        "--config", str(project(tmp_path)), "--log-file", str(log_file), "list", "prod"
    )
    assert result.returncode == 0, result.stderr
    assert log_file.parent.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("where", "phrases"),
    [
        ("folder", ["--log-file", "is a folder"]),
        ("under-a-file", ["--log-file folder", "is not a folder"]),
        ("proc", ["--log-file folder", "cannot create"]),
    ],
)
def test_log_file_in_an_impossible_place(
    tmp_path: Path, cli, where: str, phrases: list[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log_file = {
        "folder": str(tmp_path),
        "under-a-file": str(blocker / "cron.log"),
        "proc": "/proc/no-such-folder/cron.log",
    }[where]
    result = cli("--config", str(project(tmp_path)), "--log-file", log_file, "list", "prod")
    assert_clear_error(result, 2, *phrases)


@pytest.mark.xdist_group("os-users")
@pytest.mark.slow
def test_log_file_not_writable_for_the_user_running_the_command() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bp-logfile-"))
    try:
        folder.chmod(0o755)
        config = project(folder)
        config.chmod(0o644)
        locked = folder / "locked"
        locked.mkdir(mode=0o755)  # root's folder: others may enter but not write
        shared = folder / "shared"
        shared.mkdir()
        shared.chmod(0o1777)  # anyone may add files, but root's file stays root's
        existing = shared / "root.log"
        existing.write_text("")
        existing.chmod(0o644)
        with second_os_user() as user:
            results = {
                "new folder": run_as(
                    user,
                    folder,
                    "--config",
                    str(config),
                    "--log-file",
                    f"{locked}/x/cron.log",
                    "list",
                    "prod",
                ),
                "folder": run_as(
                    user,
                    folder,
                    "--config",
                    str(config),
                    "--log-file",
                    f"{locked}/cron.log",
                    "list",
                    "prod",
                ),
                "file": run_as(
                    user,
                    folder,
                    "--config",
                    str(config),
                    "--log-file",
                    str(existing),
                    "list",
                    "prod",
                ),
            }
        assert_clear_error(
            results["new folder"], 2, "cannot create --log-file folder", "Permission denied"
        )
        assert_clear_error(results["folder"], 2, "--log-file folder", "is not writable by user")
        assert_clear_error(results["file"], 2, "--log-file", "cannot be opened for writing")
        assert existing.read_text() == ""
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_unknown_target_and_unknown_command(tmp_path: Path, cli) -> None:
    config = str(project(tmp_path))
    assert_clear_error(cli("--config", config, "backup", "prdo"), 2, "unknown target 'prdo'")
    usage = cli("--config", config, "bakup", "prod")
    assert usage.returncode == 2 and "invalid choice: 'bakup'" in usage.stderr
    assert "Traceback" not in usage.stderr


# --- refusals: the same answer wherever the problem is found ----------------------------------


def test_a_second_backup_of_the_same_target_is_a_refusal(
    tmp_path: Path, run_cli, pg: LocalCluster, sample_db: str
) -> None:
    """Another backup holds the target's lock: exit 2 at once, nothing written."""
    config = project(tmp_path)
    folder = tmp_path / "b" / "prod"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_cli(
            "--config", str(config), "backup", "prod", env={"DB_PROD": pg.dsn(sample_db)}
        )
    assert_clear_error(result, 2, "another backup of this target is running", "wait for it")
    assert [p.name for p in folder.iterdir()] == [".lock"]
    # Released: the same command succeeds.
    again = run_cli("--config", str(config), "backup", "prod", env={"DB_PROD": pg.dsn(sample_db)})
    assert again.returncode == 0, again.stderr


def test_missing_passphrase_is_bad_configuration_everywhere(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BP_MISSING_PASSPHRASE", raising=False)
    config = tmp_path / "targets.yaml"
    config.write_text(
        f"backup_root: {tmp_path}/b\ntargets:\n  prod:\n    dsn_env: DB_PROD\n"
        "    encryption: {mode: passphrase, passphrase_env: BP_MISSING_PASSPHRASE}\n"
    )
    env = {"DB_PROD": "postgresql://u@127.0.0.1:1/db"}
    check = cli("--config", str(config), "check-config", env=env)
    assert_reported(check, "target 'prod'", "BP_MISSING_PASSPHRASE is not set")
    for command in ("backup", "cron-backup"):
        result = cli("--config", str(config), command, "prod", env=env)
        assert_clear_error(result, 2, "BP_MISSING_PASSPHRASE is not set", "refusing")
    assert not list((tmp_path / "b").rglob("*.gz"))


def test_unreachable_database_is_an_operation_failure(tmp_path: Path, cli) -> None:
    """For contrast: the configuration is fine, the operation failed (exit 1)."""
    result = cli(
        "--config",
        str(project(tmp_path)),
        "backup",
        "prod",
        env={"DB_PROD": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/app"},
    )
    assert_clear_error(result, 1, "cannot connect")
    assert DB_PASSWORD not in result.stdout + result.stderr


def test_unset_connection_variable(tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.delenv("DB_PROD", raising=False)
    result = cli("--config", str(project(tmp_path)), "backup", "prod")
    assert_clear_error(result, 2, "environment variable DB_PROD is not set", "export DB_PROD")


def test_restore_of_a_path_outside_the_backup_root(tmp_path: Path, cli) -> None:
    stray = tmp_path / "elsewhere.sql.gz"
    stray.write_bytes(b"")
    result = cli(
        "--config",
        str(project(tmp_path)),
        "restore",
        str(stray),
        "prod",
        "--confirm",
        "prod",
        env={"DB_PROD": "postgresql://u@127.0.0.1:1/db"},
    )
    assert_clear_error(result, 2, "is outside the backup root", "What to do")
