"""Throwaway PostgreSQL clusters for the demo, the tests and the benchmarks.

PostgreSQL refuses to run as root, so when we are root the server runs as the ``postgres`` OS
user (created by Debian's package). Client tools keep running as the current user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def pg_bin_dir() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = (
        sorted((int(p.name), p / "bin") for p in base.glob("*") if p.name.isdigit())
        if base.is_dir()
        else []
    )
    if versions:
        return versions[-1][1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install -y postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return list(argv)


@dataclass
class LocalCluster:
    """A running throwaway cluster. ``dsn(db)`` gives a libpq URL for the superuser."""

    root: Path
    port: int
    superuser: str = "postgres"
    password: str | None = None
    bin_dir: Path = field(default_factory=pg_bin_dir)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        user = user or self.superuser
        password = (
            password
            if password is not None
            else (self.password if user == self.superuser else None)
        )
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres", *, check: bool = True) -> str:
        env = {**os.environ, "PGPASSWORD": self.password or ""}
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            _as_server_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self.pg_ctl("-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("-m", mode, "-w", "stop")


def init_cluster(
    root: Path,
    *,
    port: int | None = None,
    password: str | None = None,
    extra_conf: dict[str, str] | None = None,
    start: bool = True,
) -> LocalCluster:
    """initdb a new cluster under ``root`` (must be empty or missing) and start it."""
    bin_dir = pg_bin_dir()
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root=root, port=port or free_port(), password=password, bin_dir=bin_dir)
    cluster.socket_dir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (root, cluster.socket_dir):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        # The server user must be able to reach root's temporary folders.
        parent = root.parent
        while parent != parent.parent:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o711)
            parent = parent.parent
    auth_args = ["--auth=trust"]
    pwfile = None
    if password:
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        auth_args = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run(
        _as_server_user(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data_dir),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                *auth_args,
            ]
        ),
        check=True,
        capture_output=True,
    )
    if pwfile:
        pwfile.unlink()
    conf = {
        "port": str(cluster.port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{cluster.socket_dir}'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "50",
        "shared_buffers": "64MB",
        **(extra_conf or {}),
    }
    with (cluster.data_dir / "postgresql.conf").open("a") as handle:
        handle.write("\n# backup_pipelines throwaway cluster\n")
        for key, value in conf.items():
            handle.write(f"{key} = {value}\n")
    if start:
        cluster.start()
    return cluster


@contextlib.contextmanager
def throwaway_cluster(**kwargs: Any) -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="bp-pg-"))
    cluster = init_cluster(root, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def standby_of(primary: LocalCluster) -> Iterator[LocalCluster]:
    """A hot standby streaming from ``primary`` (``pg_basebackup -R``), read-only, on its own
    port; stopped and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="bp-standby-"))
    standby = LocalCluster(
        root=root, port=free_port(), password=primary.password, bin_dir=primary.bin_dir
    )
    standby.socket_dir.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (root, standby.socket_dir):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(primary.bin_dir / "pg_basebackup"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(primary.port),
                    "-U",
                    primary.superuser,
                    "-D",
                    str(standby.data_dir),
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                ]
            ),
            check=True,
            capture_output=True,
            env={**os.environ, "PGPASSWORD": primary.password or ""},
        )
        with (standby.data_dir / "postgresql.auto.conf").open("a") as handle:
            handle.write(f"port = {standby.port}\n")
            handle.write(f"unix_socket_directories = '{standby.socket_dir}'\n")
        standby.start()
        wait_ready(standby)
        yield standby
    finally:
        standby.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def wait_ready(cluster: LocalCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [str(cluster.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(cluster.port)],
            capture_output=True,
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"PostgreSQL on port {cluster.port} did not become ready")
