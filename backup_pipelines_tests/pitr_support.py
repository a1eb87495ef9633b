"""Helpers for the PITR tests: a cluster whose archive_command is our real ``wal-push``.

PostgreSQL runs as the ``postgres`` OS user when the tests run as root, and so do its
``archive_command`` and ``restore_command``. That user must be able to run this project's CLI:
when the virtualenv's interpreter is out of its reach (e.g. under root's home), the same
packages run on the system's python3 of the same minor version through a small launcher.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import backup_pipelines
from backup_pipelines.devtools.local_postgres import LocalCluster, free_port, init_cluster
from backup_pipelines.engine.config import CONFIG_ENV_VAR, ProjectConfig, Target, load_config
from backup_pipelines.engine.wal import postgresql_conf_lines

VENV_BIN = Path(sys.executable).parent
TARGET = "main"
DSN_ENV = "PITR_TEST_DATABASE_URL"
PASSWORD = "pitr-" + os.urandom(6).hex()


def server_user_command(workdir: Path) -> str:
    """A command prefix that runs ``backup-pipelines`` as the server's OS user."""
    cli = VENV_BIN / "backup-pipelines"
    if os.geteuid() != 0:
        return shlex.quote(str(cli))
    probe = subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(VENV_BIN / "python"),
            "-c",
            "import backup_pipelines",
        ],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return shlex.quote(str(cli))
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.skip(
            f"the postgres OS user cannot run {sys.executable} and {system_python} is missing"
        )
    repo = Path(backup_pipelines.__file__).resolve().parents[1]
    site = sysconfig.get_paths()["purelib"]
    launcher = workdir / "backup-pipelines-as-server-user"
    launcher.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(f'{repo}:{site}')} exec {system_python} -c "
        "'import sys; from backup_pipelines.cli import main; sys.exit(main())' \"$@\"\n"
    )
    launcher.chmod(0o755)
    return shlex.quote(str(launcher))


def chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


@dataclass
class PitrSetup:
    cluster: LocalCluster
    config: ProjectConfig
    archive_dir: Path | None
    workdir: Path

    @property
    def target(self) -> Target:
        return self.config.target(TARGET)

    def sql(self, statement: str, db: str = "postgres") -> str:
        return self.cluster.psql(statement, db)

    def switch_and_wait(self, timeout: float = 60) -> str:
        """Close the current segment and wait until the archiver reports it archived."""
        segment = self.sql("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            if done and done >= segment:
                return segment
            time.sleep(0.2)
        log = (self.cluster.root / "server.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{segment} was not archived in {timeout}s; server log:\n{log}")

    def close(self) -> None:
        self.cluster.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_pitr_cluster(
    monkeypatch: pytest.MonkeyPatch,
    *,
    pitr: dict[str, Any] | None = None,
    local_archive: bool = True,
    env: dict[str, str] | None = None,
    top: dict[str, Any] | None = None,
    target: dict[str, Any] | None = None,
) -> PitrSetup:
    """A running cluster archiving through ``wal-push`` into a fresh archive (local and/or S3).

    Everything lives in its own folder under the system temp dir, not under pytest's tmp_path:
    pytest resets ``/tmp/pytest-of-<user>`` to 0700 whenever any session starts, which would
    lock the server's OS user out of its archive in the middle of a test.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bp-pitr-"))
    workdir.chmod(0o755)
    archive_dir = workdir / "wal-archive" if local_archive else None
    if archive_dir is not None:
        archive_dir.mkdir(mode=0o700)
        chown_to_server_user(archive_dir)
    port = free_port()
    settings: dict[str, Any] = {"command": server_user_command(workdir), **(pitr or {})}
    if archive_dir is not None:
        settings["archive_dir"] = str(archive_dir)
    config_path = workdir / "backup_targets.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "backup_root": str(workdir / "backups"),
                **(top or {}),
                "targets": {TARGET: {"dsn_env": DSN_ENV, **(target or {}), "pitr": settings}},
            },
            sort_keys=False,
        )
    )
    config_path.chmod(0o644)
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config_path))
    monkeypatch.setenv(DSN_ENV, f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres")
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    from backup_pipelines.lib.project import project_config

    project_config.cache_clear()
    config = load_config(config_path)
    conf = {}
    for line in postgresql_conf_lines(config, config.target(TARGET), archive_timeout_seconds=60):
        key, value = line.split(" = ", 1)
        conf[key] = value
    try:
        cluster = init_cluster(workdir / "pg", port=port, password=PASSWORD, extra_conf=conf)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return PitrSetup(cluster, config, archive_dir, workdir)
