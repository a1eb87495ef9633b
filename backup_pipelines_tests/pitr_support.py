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
from backup_pipelines.devtools.local_postgres import (
    LocalCluster,
    free_port,
    init_cluster,
    pg_bin_dir,
)
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
    port = free_port()
    config, archive_dir, conf = _write_project(
        monkeypatch, workdir, port, pitr, local_archive, env, top, target
    )
    try:
        cluster = init_cluster(workdir / "pg", port=port, password=PASSWORD, extra_conf=conf)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return PitrSetup(cluster, config, archive_dir, workdir)


def _write_project(
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    port: int,
    pitr: dict[str, Any] | None,
    local_archive: bool,
    env: dict[str, str] | None,
    top: dict[str, Any] | None,
    target: dict[str, Any] | None,
) -> tuple[ProjectConfig, Path | None, dict[str, str]]:
    """The targets file for a cluster on ``port``; returns it loaded, the archive folder and the
    postgresql.conf settings that archive into it."""
    archive_dir = workdir / "wal-archive" if local_archive else None
    if archive_dir is not None:
        archive_dir.mkdir(mode=0o700)
        chown_to_server_user(archive_dir)
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
    return config, archive_dir, conf


@dataclass
class DebianPitrSetup(PitrSetup):
    """A cluster made by Debian's postgresql-common: data in /var/lib/postgresql/<ver>/<name>,
    configuration (postgresql.conf, pg_hba.conf, pg_ident.conf, conf.d/) in
    /etc/postgresql/<ver>/<name>/. Archiving is switched on by a file in conf.d/."""

    version: int = 0
    name: str = ""

    @property
    def etc_dir(self) -> Path:
        return Path(f"/etc/postgresql/{self.version}/{self.name}")

    @property
    def data_dir(self) -> Path:
        return Path(f"/var/lib/postgresql/{self.version}/{self.name}")

    @property
    def log_path(self) -> Path:
        return Path(f"/var/log/postgresql/postgresql-{self.version}-{self.name}.log")

    def close(self) -> None:
        subprocess.run(
            ["pg_dropcluster", "--stop", str(self.version), self.name],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_debian_pitr_cluster(
    monkeypatch: pytest.MonkeyPatch, *, target: dict[str, Any] | None = None
) -> DebianPitrSetup:
    """``pg_createcluster`` a uniquely named cluster (parallel workers never collide), archive
    through ``wal-push`` configured in ``conf.d/``, start it with ``pg_ctlcluster``."""
    if os.geteuid() != 0:
        pytest.skip(
            "pg_createcluster/pg_ctlcluster need root (they create the cluster as postgres)"
        )
    if not shutil.which("pg_createcluster"):
        pytest.skip("postgresql-common (pg_createcluster) is not installed")
    version = int(pg_bin_dir().parent.name)
    name = "t_" + os.urandom(5).hex()
    workdir = Path(tempfile.mkdtemp(prefix="bp-pitr-deb-"))
    workdir.chmod(0o755)
    port = free_port()
    config, archive_dir, conf = _write_project(
        monkeypatch, workdir, port, None, True, None, None, target
    )
    cluster = LocalCluster(root=workdir, port=port, password=PASSWORD)
    setup = DebianPitrSetup(cluster, config, archive_dir, workdir, version=version, name=name)
    try:
        subprocess.run(
            ["pg_createcluster", str(version), name, "-p", str(port)],
            check=True,
            capture_output=True,
        )
        conf.update(
            listen_addresses="'127.0.0.1'", fsync="off", synchronous_commit="off",
            shared_buffers="'64MB'", max_connections="50",
        )  # fmt: skip
        dropin = setup.etc_dir / "conf.d" / "backup_pipelines.conf"
        dropin.write_text("".join(f"{key} = {value}\n" for key, value in conf.items()))
        chown_to_server_user(dropin)
        subprocess.run(
            ["pg_ctlcluster", str(version), name, "start"], check=True, capture_output=True
        )
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-p", str(port), "-f", "-"],
            input=f"ALTER USER postgres PASSWORD '{PASSWORD}';\n",
            text=True,
            check=True,
            capture_output=True,
        )
    except BaseException:
        setup.close()
        raise
    return setup
