"""Fault matrix, folders the tool did not create: shared, read-only, a file, not writable.

New folders are made 0700 (backups 0600); a folder that already exists keeps its mode and
owner (a shared 1777 or NFS folder stays shared) and only gets a warning when other users can
see into it. A folder the tool cannot use is one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import ast
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import backup_pipelines.engine
from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.errors import FolderError
from backup_pipelines.engine.fsutil import ensure_private_dir
from backup_pipelines.engine.metrics import TargetMetrics, write_textfile
from backup_pipelines_tests.fault_matrix.clear_errors import (
    assert_clear_error,
    assert_reported,
    run_as,
    second_os_user,
)
from backup_pipelines_tests.pitr_support import server_user_command


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def config_for(folder: Path, backup_root: Path | str, **target: object) -> Path:
    path = folder / "targets.yaml"
    spec = {"dsn_env": "DB_PROD", **target}
    path.write_text(yaml.safe_dump({"backup_root": str(backup_root), "targets": {"prod": spec}}))
    path.chmod(0o644)
    return path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder outside pytest's 0700 tmp tree, so a second OS user can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="bp-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_existing_shared_backup_root_keeps_its_mode(
    shared_tmp: Path, cli, pg: LocalCluster, sample_db: str
) -> None:
    """A 1777 (shared / NFS-style) backup_root was chmodded to 0700 before: now it stays."""
    root = shared_tmp / "shared"
    root.mkdir()
    root.chmod(0o1777)
    config = config_for(shared_tmp, root)
    result = cli("--config", str(config), "backup", "prod", env={"DB_PROD": pg.dsn(sample_db)})
    assert result.returncode == 0, result.stderr
    assert mode_of(root) == 0o1777
    assert "backup_root" in result.stderr and "(mode 1777) lets other users" in result.stderr
    # What the tool made itself is private.
    target_dir = root / "prod"
    assert mode_of(target_dir) == 0o700
    files = [p for p in target_dir.iterdir() if p.name != ".lock"]
    # The backup, its .sha256 and .meta, the globals file and its .sha256.
    assert len(files) == 5 and all(mode_of(p) == 0o600 for p in files)


def test_new_backup_root_and_its_missing_parents_are_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "backups"
    old_umask = os.umask(0o022)  # what a default login shell has
    try:
        ensure_private_dir(root, what="backup_root")
    finally:
        os.umask(old_umask)
    assert [mode_of(p) for p in (tmp_path / "a", tmp_path / "a" / "b", root)] == [0o700] * 3


def test_existing_private_folder_is_used_silently(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "team"
    folder.mkdir()
    folder.chmod(0o750)
    with caplog.at_level(logging.WARNING, logger="backup_pipelines"):
        ensure_private_dir(folder, what="backup_root")
    assert mode_of(folder) == 0o750
    assert not caplog.records


def test_parents_another_user_must_traverse(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv" / "restored"
    ensure_private_dir(data_dir, what="--data-dir", parent_mode=0o711)
    assert (mode_of(tmp_path / "srv"), mode_of(data_dir)) == (0o711, 0o700)


def test_backup_root_that_is_a_file(tmp_path: Path, cli) -> None:
    blocker = tmp_path / "backups"
    blocker.write_text("a file where the folder should be")
    for root, phrase in (
        (blocker, "is not a folder"),
        (blocker / "nested", f"({blocker} is a file)"),
    ):
        config = config_for(tmp_path, root)
        env = {"DB_PROD": "postgresql://u@127.0.0.1:1/db"}
        result = cli("--config", str(config), "backup", "prod", env=env)
        assert_clear_error(result, 2, "backup_root", phrase)
        assert_reported(cli("--config", str(config), "check-config", env=env), phrase)
    assert blocker.read_text() == "a file where the folder should be"


def test_read_only_backup_root(tmp_path: Path, cli) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)]
    ).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        env = {"DB_PROD": "postgresql://u@127.0.0.1:1/db"}
        for root, phrase in (
            (mount_point, "is not writable by user root (read-only file system)"),
            (mount_point / "backups", "cannot create backup_root"),
        ):
            config = config_for(tmp_path, root)
            result = cli("--config", str(config), "backup", "prod", env=env)
            line = assert_clear_error(result, 2, phrase)
            assert "read-only file system" in line.lower()
            check = cli("--config", str(config), "check-config", env=env)
            assert_reported(check, "backup_root", "read-only file system")
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.xdist_group("os-users")
@pytest.mark.slow
def test_backup_root_not_writable_by_the_user_running_backups(shared_tmp: Path) -> None:
    """The folder exists but belongs to someone else (root, 0755): refused before any work."""
    root = shared_tmp / "root-only"
    root.mkdir(mode=0o755)
    config = config_for(shared_tmp, root)
    env = {"DB_PROD": "postgresql://u@127.0.0.1:1/db"}
    with second_os_user() as user:
        result = run_as(user, shared_tmp, "--config", str(config), "backup", "prod", env=env)
        check = run_as(user, shared_tmp, "--config", str(config), "check-config", env=env)
    assert_clear_error(result, 2, f"backup_root {root} is not writable by user {user}")
    assert_reported(check, f"backup_root {root} is not writable by user {user}")
    assert list(root.iterdir()) == []


def test_wal_setup_leaves_an_existing_archive_folder_alone(shared_tmp: Path, run_cli) -> None:
    existing = shared_tmp / "wal-shared"
    existing.mkdir()
    existing.chmod(0o1777)
    owner = existing.stat().st_uid
    # wal-setup first checks that postgres can run the command: one it can reach.
    command = server_user_command(shared_tmp)
    config = config_for(
        shared_tmp, shared_tmp / "b", pitr={"archive_dir": str(existing), "command": command}
    )
    result = run_cli("--config", str(config), "wal-setup", "prod")
    assert result.returncode == 0, result.stderr
    assert mode_of(existing) == 0o1777 and existing.stat().st_uid == owner
    assert "lets other users read and write" in result.stderr
    assert "mode 1777" in result.stdout


@pytest.mark.slow  # wal-setup runs the archive command as postgres (runuser)
def test_wal_setup_creates_a_new_archive_for_the_server_user(shared_tmp: Path, cli) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the folder to the server's OS user")
    archive = shared_tmp / "var" / "wal" / "prod"
    command = server_user_command(shared_tmp)
    config = config_for(
        shared_tmp, shared_tmp / "b", pitr={"archive_dir": str(archive), "command": command}
    )
    result = cli("--config", str(config), "wal-setup", "prod")
    assert result.returncode == 0, result.stderr
    assert mode_of(archive) == 0o700
    assert archive.stat().st_uid == pwd.getpwnam("postgres").pw_uid
    # postgres must reach it through the parents the tool created.
    assert mode_of(shared_tmp / "var") == mode_of(shared_tmp / "var" / "wal") == 0o711


def test_metrics_folder_stays_readable_for_node_exporter(tmp_path: Path) -> None:
    textfile = tmp_path / "node-exporter" / "backup_pipelines.prom"
    write_textfile(textfile, [TargetMetrics(target="prod", backup_success=True)])
    assert mode_of(textfile.parent) == 0o755
    assert mode_of(textfile) == 0o644


def test_folder_error_is_a_refusal_naming_the_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(FolderError) as caught:
        ensure_private_dir(blocker / "x", what="WAL archive folder")
    assert caught.value.exit_code == 2
    assert f"WAL archive folder {blocker / 'x'} is not a folder" in caught.value.message


def test_the_engine_makes_folders_only_through_the_one_helper() -> None:
    """Structural guard: no other mkdir/makedirs in the engine, so the rule cannot be bypassed."""
    engine = Path(backup_pipelines.engine.__file__).parent
    offenders = []
    for source in sorted(engine.glob("*.py")):
        if source.name == "fsutil.py":
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in {"mkdir", "makedirs"}:
                    offenders.append(f"{source.name}:{node.lineno}")
    assert offenders == []
