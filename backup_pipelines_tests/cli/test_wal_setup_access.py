"""wal-setup runs the archive command as the server's OS user before printing the
postgresql.conf lines: a program (or its interpreter, or the targets file) that user cannot
reach is refused at once with the folder to fix, not discovered as exit 126 once archiving
starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from backup_pipelines_tests.pitr_support import server_user_command

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("checking access as the postgres OS user needs root (runuser)")
    # Not under pytest's tmp_path: that is 0700 root and would block every path below it.
    folder = Path(tempfile.mkdtemp(prefix="bp-walsetup-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _targets(folder: Path, command: Path, archive: Path) -> Path:
    path = folder / "backup_targets.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backup_root": str(folder / "backups"),
                "targets": {
                    "main": {
                        "dsn_env": "WAL_SETUP_TEST_URL",
                        "pitr": {"command": str(command), "archive_dir": str(archive)},
                    }
                },
            }
        )
    )
    path.chmod(0o644)
    return path


def test_wal_setup_refuses_a_command_the_server_user_cannot_reach(workdir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    launcher = server_user_command(workdir)  # runs this checkout as postgres
    private = workdir / "private"
    private.mkdir(mode=0o700)  # root's, like a virtualenv under /root
    program = private / "backup-pipelines"
    program.write_text(f'#!/bin/sh\nexec {launcher} "$@"\n')
    program.chmod(0o755)
    archive = workdir / "archive"
    config = _targets(workdir, program, archive)

    refused = run_cli("--config", str(config), "wal-setup", "main")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "the server's OS user postgres cannot run the archive command" in lines[0]
    assert f"{private} is not accessible (mode 0700, owner root" in lines[0]
    assert "Traceback" not in refused.stderr
    assert "wal_level" not in refused.stdout  # no postgresql.conf lines for a broken command
    assert not archive.exists()  # refused before anything was created

    # The targets file must be readable by that user too.
    private.chmod(0o755)
    secret = workdir / "secret"
    secret.mkdir(mode=0o700)
    hidden = secret / "backup_targets.yaml"
    config.rename(hidden)
    refused = run_cli("--config", str(hidden), "wal-setup", "main")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{secret} is not accessible (mode 0700, owner root" in refused.stderr

    # Once reachable, the same check passes and the setup goes ahead.
    secret.chmod(0o755)
    done = run_cli("--config", str(hidden), "wal-setup", "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"postgres can run {program}" in done.stdout
    assert "archive_mode = on" in done.stdout
    assert archive.is_dir() and archive.owner() == "postgres"
