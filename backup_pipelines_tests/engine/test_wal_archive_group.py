"""``pitr.archive_group``: the local WAL archive shared with one OS group (files 0640, folders
2750, that group) on every push, so monitoring, restores and drills running as another user in
the group read it; nobody else reads anything. The OS-user case with a real server is in
``test_wal_archive_access.py``."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from backup_pipelines.engine.config import CONFIG_ENV_VAR, PitrSettings
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.wal import (
    WalArchive,
    WalStore,
    local_wal_storage,
    object_stem,
    wal_fetch,
    wal_push,
)
from backup_pipelines_tests.pitr_support import server_user_command

SEGMENT = "000000010000000000000003"
LATER = "000000010000000100000000"  # another log: a new folder
HISTORY = "00000002.history"


def _group() -> grp.struct_group:
    if os.geteuid() != 0:
        pytest.skip("needs root to give files a group it is not the primary group of")
    return grp.getgrnam("daemon")


def _modes(root: Path) -> dict[str, tuple[int, int]]:
    found = {".": (stat.S_IMODE(root.stat().st_mode), root.stat().st_gid)}
    for path in root.rglob("*"):
        info = path.stat()
        found[path.relative_to(root).as_posix()] = (stat.S_IMODE(info.st_mode), info.st_gid)
    return found


def _write(folder: Path, name: str, seed: int) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(bytes([seed]) * 4096 + os.urandom(4096) + b"\0" * (1 << 20))
    return path


def test_every_push_leaves_files_0640_and_folders_2750_with_the_group(tmp_path: Path) -> None:
    group = _group()
    root = tmp_path / "archive"
    root.mkdir(mode=0o700)
    storage = local_wal_storage(root, group=group.gr_gid)
    settings = PitrSettings(archive_dir=root, archive_group=group.gr_name)
    archive = WalArchive("main", settings, [WalStore(storage)])
    sources = [_write(tmp_path / "pg_wal", n, i) for i, n in enumerate((SEGMENT, LATER, HISTORY))]
    for source in sources[:2]:
        wal_push(archive, source)
    # Someone "fixes" a folder by hand the wrong way: the next push into it puts it back.
    folder = root / object_stem(SEGMENT).split("/")[0]
    os.chown(folder, -1, 0)
    folder.chmod(0o700)
    wal_push(archive, _write(tmp_path / "pg_wal", "000000010000000000000004", 9))
    wal_push(archive, sources[2])
    modes = _modes(root)
    modes.pop(".")  # the root is wal-setup's (tested below)
    assert len(modes) == 3 + 4 * 2  # three folders, four files with their records
    for name, (mode, gid) in modes.items():
        wanted = 0o2750 if (root / name).is_dir() else 0o640
        assert (oct(mode), gid) == (oct(wanted), group.gr_gid), name
    destination = tmp_path / "RECOVERYXLOG"
    wal_fetch(archive, SEGMENT, destination)
    assert destination.read_bytes() == sources[0].read_bytes()
    assert stat.S_IMODE(destination.stat().st_mode) == 0o600  # pg_wal stays private


def test_without_the_group_the_archive_stays_private(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir(mode=0o700)
    archive = WalArchive(
        "main", PitrSettings(archive_dir=root), [WalStore(local_wal_storage(root))]
    )
    wal_push(archive, _write(tmp_path / "pg_wal", SEGMENT, 1))
    for name, (mode, _gid) in _modes(root).items():
        assert mode == (0o700 if (root / name).is_dir() else 0o600), name


def test_an_unknown_group_is_a_configuration_error_naming_it(make_project) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        make_project(
            {
                "main": {
                    "dsn_env": "UNUSED_DSN",
                    "pitr": {"archive_dir": "/srv/wal", "archive_group": "bp-no-such-group"},
                }
            }
        )
    assert "'bp-no-such-group' does not exist" in caught.value.one_line()
    assert "groupadd bp-no-such-group" in caught.value.one_line()


@pytest.mark.slow  # wal-setup runs the archive command as the server's OS user (runuser)
def test_wal_setup_brings_an_existing_archive_to_the_shared_layout(
    tmp_path: Path, make_project, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    group = _group()
    root = tmp_path / "archive"
    root.mkdir(mode=0o700)
    # wal-setup first checks that postgres can run the command: one it can reach.
    reachable = Path(tempfile.mkdtemp(prefix="bp-cmd-"))
    reachable.chmod(0o755)
    command = server_user_command(reachable)
    project = {"dsn_env": "UNUSED_DSN", "pitr": {"archive_dir": str(root), "command": command}}
    make_project({"main": project})
    assert cli("wal-push", str(_write(tmp_path / "pg_wal", SEGMENT, 1))).returncode == 0
    assert {m for m, _g in _modes(root).values()} == {0o700, 0o600}

    project["pitr"]["archive_group"] = group.gr_name  # type: ignore[index]
    make_project({"main": project})
    # ... and read the targets file: a copy where it can.
    readable = reachable / "backup_targets.yaml"
    shutil.copy(tmp_path / "backup_targets.yaml", readable)
    readable.chmod(0o644)
    monkeypatch.setenv(CONFIG_ENV_VAR, str(readable))
    result = cli("wal-setup", "main")
    assert result.returncode == 0, result.stderr
    shutil.rmtree(reachable, ignore_errors=True)
    assert "mode 2750, readable by group daemon" in result.stdout
    for name, (mode, gid) in _modes(root).items():
        wanted = 0o2750 if (root / name).is_dir() else 0o640
        assert (oct(mode), gid) == (oct(wanted), group.gr_gid), name
