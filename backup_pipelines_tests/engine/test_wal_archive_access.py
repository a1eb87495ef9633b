"""The documented deployment reads its own archive: the server archives as ``postgres``, a
second OS user in ``pitr.archive_group`` (like the systemd units' ``dagster``) monitors, fetches
and drills from it, and a user outside the group reads nothing. Real OS users, a real server."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.wal import wal_archive_for, wal_fetch
from backup_pipelines_tests.fault_matrix.clear_errors import assert_clear_error, run_as
from backup_pipelines_tests.pitr_support import start_pitr_cluster


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def os_users() -> Iterator[tuple[str, str, str]]:
    """(group, reader in the group, outsider); postgres joins the group for the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create OS users")
    tag = uuid.uuid4().hex[:8]
    group, reader, outsider = f"bpa{tag}", f"bpr{tag}", f"bpo{tag}"
    _run("groupadd", group)
    try:
        _run("useradd", "-M", "-U", "-s", "/bin/sh", "-G", group, reader)
        _run("useradd", "-M", "-U", "-s", "/bin/sh", outsider)
        _run("usermod", "-aG", group, "postgres")
        yield group, reader, outsider
    finally:
        subprocess.run(["gpasswd", "-d", "postgres", group], check=False, capture_output=True)
        for user in (reader, outsider):
            subprocess.run(["userdel", user], check=False, capture_output=True)
            subprocess.run(["groupdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def _give_to(root: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for path in [root, *root.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _as(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=60
    )


@pytest.mark.xdist_group("os-users")
@pytest.mark.postgres
@pytest.mark.slow
def test_the_archive_group_monitors_fetches_and_drills_and_nobody_else_reads(
    monkeypatch: pytest.MonkeyPatch, os_users: tuple[str, str, str], cli
) -> None:  # type: ignore[no-untyped-def]
    group, reader, outsider = os_users
    setup = start_pitr_cluster(monkeypatch, pitr={"archive_group": group})
    try:
        archive_dir = setup.archive_dir
        assert archive_dir is not None
        # The operator's setup step, as root, before the server archives anything.
        setup_result = cli("wal-setup", "main")
        assert setup_result.returncode == 0, setup_result.stderr
        # The monitoring user (dagster in the systemd units) owns the base backups it takes.
        run_base_backup(setup.target)
        _give_to(setup.workdir / "backups", reader)

        setup.sql("CREATE TABLE t (id int)")
        setup.sql("INSERT INTO t SELECT generate_series(1, 100)")
        segment = setup.switch_and_wait()

        # Everything archived by the server: postgres-owned, group-readable, nothing more.
        group_gid = grp.getgrnam(group).gr_gid
        entries = [archive_dir, *archive_dir.rglob("*")]
        assert len(entries) > 4
        for path in entries:
            info = path.stat()
            wanted = 0o2750 if path.is_dir() else 0o640
            assert (oct(stat.S_IMODE(info.st_mode)), info.st_gid) == (oct(wanted), group_gid), path
            assert info.st_uid == pwd.getpwnam("postgres").pw_uid, path

        # The reader monitors, fetches and drills.
        status = run_as(reader, setup.workdir, "wal-status", "main")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "recoverable range" in status.stdout and "cannot read" not in status.stderr
        landing = setup.workdir / "landing"
        landing.mkdir(mode=0o700)
        os.chown(landing, pwd.getpwnam(reader).pw_uid, -1)
        fetched = run_as(
            reader, setup.workdir, "wal-fetch", "--target", "main", segment, str(landing / "x")
        )
        assert fetched.returncode == 0, fetched.stderr
        expected = setup.workdir / "expected"
        wal_fetch(wal_archive_for(setup.target), segment, expected)
        assert (
            hashlib.sha256((landing / "x").read_bytes()).digest()
            == hashlib.sha256(expected.read_bytes()).digest()
        )
        # The outsider reads nothing: not the listing, not a file, not through the tool.
        some_file = next(p for p in archive_dir.rglob("*.meta"))
        assert _as(outsider, "ls", str(archive_dir)).returncode != 0
        assert _as(outsider, "cat", str(some_file)).returncode != 0
        assert _as(reader, "cat", str(some_file)).returncode == 0
        denied = run_as(outsider, setup.workdir, "wal-status", "main")
        assert denied.returncode != 0 and "Traceback" not in denied.stderr
        assert "Permission denied" in denied.stderr
        refused = run_as(
            outsider, setup.workdir, "wal-fetch", "--target", "main", segment, "/tmp/never"
        )
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "Permission denied" in refused.stderr, refused.stderr
        assert not Path("/tmp/never").exists()
        # The reader may run us with Debian's python3 (3.11.2, no tarfile filters): the base
        # backup's extraction applies the same rules by hand there.
        drill = run_as(reader, setup.workdir, "pitr-drill", "main")
        assert drill.returncode == 0, drill.stdout + drill.stderr
        assert "passed" in (drill.stdout + drill.stderr).lower()

    finally:
        setup.close()


@pytest.mark.xdist_group("os-users")
@pytest.mark.slow
def test_a_pusher_outside_the_group_fails_in_one_line_and_stores_nothing(
    tmp_path: Path, os_users: tuple[str, str, str]
) -> None:
    """A folder lost its group and the pushing user may not give it back: wal-push exits 1
    (PostgreSQL retries) with one line saying what to do, and no segment appears."""
    group, _reader, outsider = os_users
    work = Path(tempfile.mkdtemp(prefix="bp-grp-"))
    try:
        work.chmod(0o755)
        archive = work / "archive"
        folder = archive / "0000000100000000"
        folder.mkdir(parents=True)
        entry = pwd.getpwnam(outsider)
        for path in (archive, folder):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        archive.chmod(0o700)
        folder.chmod(0o700)
        segment = work / "000000010000000000000003"
        segment.write_bytes(os.urandom(1 << 16))
        segment.chmod(0o644)
        config = work / "backup_targets.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "backup_root": str(work / "b"),
                    "targets": {
                        "main": {
                            "dsn_env": "UNUSED_DSN",
                            "pitr": {"archive_dir": str(archive), "archive_group": group},
                        }
                    },
                }
            )
        )
        config.chmod(0o644)
        result = run_as(outsider, work, "--config", str(config), "wal-push", str(segment))
        line = assert_clear_error(result, 1, "wal-push FAILED", "is not a member of it")
        assert f"usermod -aG {group}" in line
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
