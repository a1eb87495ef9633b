"""A throwaway PostgreSQL cluster for the fresh-server restore drill.

The drill proves that the backup set alone restores the database on a server that never had
it: a cluster initialised for the drill (``initdb`` with the binaries of the backup's server
major version), in a temporary folder, on a free port, always stopped and deleted afterwards.

It listens on a Unix socket only (``listen_addresses = ''``) in a folder only its OS user and
root can open, so its ``trust`` authentication admits nobody else. As root the server runs as
``restore.drill.server_os_user`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import sql

from backup_pipelines.engine.backup.base_reader import chown_tree
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import RestoreFailedError
from backup_pipelines.engine.pitr.server import (
    as_server_user,
    server_failure_reason,
    server_log_lines,
    stop_server,
)
from backup_pipelines.engine.postgres import connect
from backup_pipelines.engine.processes import one_line

FRESH_SERVER = "fresh_server"
SAME_SERVER = "same_server"
SUPERUSER = "postgres"
_START_TIMEOUT_SECONDS = 120


def _binaries_major(bin_dir: Path) -> int | None:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    with contextlib.suppress(ValueError, IndexError):
        return int(out.split(")")[1].split()[0].split(".")[0])
    return None


def _candidate_dirs(major: int, configured: Path | None) -> list[Path]:
    candidates = [configured] if configured else []
    candidates += [Path(f"/usr/lib/postgresql/{major}/bin"), Path(f"/usr/pgsql-{major}/bin")]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    return candidates


def fresh_server_binaries(major: int, target: Target) -> tuple[Path | None, str]:
    """The folder holding ``initdb``/``pg_ctl``/``postgres`` of exactly ``major``, or None
    and why a fresh-server drill cannot run on this host."""
    if os.geteuid() == 0:
        user = target.settings.restore.drill.server_os_user
        try:
            pwd.getpwnam(user)
        except KeyError:
            return None, (
                f"the OS user {user!r} to run the throwaway cluster as does not exist "
                "(restore.drill.server_os_user)"
            )
    for candidate in _candidate_dirs(major, target.settings.pg_bin_dir):
        if all((candidate / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")) and (
            _binaries_major(candidate) == major
        ):
            return candidate, ""
    return None, (
        f"the PostgreSQL {major} server binaries (initdb, pg_ctl, postgres) of the backup's "
        f"server are not installed on this host (install postgresql-{major} or set pg_bin_dir)"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str], user: str, what: str) -> None:
    result = subprocess.run(as_server_user(argv, user), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RestoreFailedError(
            f"{what} of the throwaway drill cluster failed: "
            f"{one_line(result.stderr or result.stdout) or f'exit status {result.returncode}'}"
        )


@dataclass(frozen=True)
class ThrowawayCluster:
    """A started drill cluster: its superuser connection, its folder and its OS user."""

    admin: ConnectionInfo
    root: Path
    os_user: str

    def create_tablespaces(self, names: Iterable[str], *, log: Any) -> list[str]:
        """Create the source server's tablespaces here, each in an empty folder of this
        cluster. The backup's objects then go into tablespaces of the same names, as they would
        on a rebuilt server where the operator has created them first. Without this, every
        database that uses a tablespace would fail its drill. Returns the names created."""
        created: list[str] = []
        folders = self.root / "tablespaces"
        with connect(self.admin, autocommit=True) as conn:
            present = {row[0] for row in conn.execute("SELECT spcname FROM pg_tablespace")}
            for name in names:
                if name in present or name in created:
                    continue
                folder = folders / str(len(created))
                folder.mkdir(mode=0o700, parents=True)
                chown_tree(folders, self.os_user)
                conn.execute(
                    sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                        sql.Identifier(name), sql.Literal(str(folder))
                    )
                )
                created.append(name)
        if created:
            log.info(
                "Fresh-server drill: created the source server's tablespaces in the throwaway "
                "cluster's folder: " + ", ".join(created)
            )
        return created


@contextlib.contextmanager
def throwaway_cluster(bin_dir: Path, target: Target, *, log: Any) -> Iterator[ThrowawayCluster]:
    """initdb + start a new cluster; yields it, with a superuser connection to its
    ``postgres`` database. Stopped and deleted on the way out, whatever happened."""
    user = target.settings.restore.drill.server_os_user
    root = Path(tempfile.mkdtemp(prefix=f"bp-drill-fresh-{target.name}-"))
    # The server's OS user must reach its data folder; nothing else is readable for others.
    root.chmod(0o711)
    data_dir, socket_dir, log_path = root / "data", root / "sock", root / "server.log"
    socket_dir.mkdir(mode=0o700)
    log_path.touch(mode=0o600)
    port = _free_port()
    chown_tree(root, user)  # as root only: the server's OS user creates its data folder here
    try:
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            user,
            "initdb",
        )
        settings = {
            "port": str(port),
            "listen_addresses": "''",
            "unix_socket_directories": f"'{socket_dir}'",
            "unix_socket_permissions": "0700",
            # A throwaway copy: crash safety buys nothing and costs restore time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "30",
        }
        with (data_dir / "postgresql.conf").open("a") as handle:
            handle.write("\n# backup_pipelines fresh-server restore drill\n")
            for key, value in settings.items():
                handle.write(f"{key} = {value}\n")
        result = subprocess.run(
            as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data_dir),
                    "-l",
                    str(log_path),
                    "-w",
                    "-t",
                    str(_START_TIMEOUT_SECONDS),
                    "start",
                ],
                user,
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            reason = server_failure_reason(
                server_log_lines(log_path, data_dir), result.stdout + result.stderr
            )
            raise RestoreFailedError(
                f"the throwaway drill cluster did not start: {reason or 'see its log'}"
            )
        log.info(
            f"Fresh-server drill: started a new PostgreSQL cluster ({bin_dir}) on port {port} "
            f"in {root}"
        )
        admin = ConnectionInfo(
            {"host": str(socket_dir), "port": str(port), "user": SUPERUSER, "dbname": "postgres"}
        )
        yield ThrowawayCluster(admin, root, user)
    finally:
        with contextlib.suppress(Exception):
            stop_server(data_dir, bin_dir, user, "immediate")
        shutil.rmtree(root, ignore_errors=True)
        log.info(f"Fresh-server drill: the throwaway cluster in {root} is stopped and deleted")


def choose_drill_mode(
    target: Target, major: int, requested: bool | None
) -> tuple[str, Path | None, str]:
    """Which drill runs: ``fresh_server`` (with the binaries' folder) or ``same_server``, and
    why not fresh. ``requested`` (the CLI's --fresh-server / --same-server) overrides
    ``restore.drill.fresh_server``. Raises when a fresh server is required but impossible."""
    setting = requested if requested is not None else target.settings.restore.drill.fresh_server
    if setting is False:
        return SAME_SERVER, None, "fresh_server is off for this drill"
    if setting == "auto" and target.settings.scratch_dsn_env:
        # The operator chose a drill server: auto keeps drilling there (true overrides).
        return SAME_SERVER, None, "the target names a drill server (scratch_dsn_env)"
    bin_dir, why = fresh_server_binaries(major, target)
    if bin_dir is None:
        if setting is True:
            raise RestoreFailedError(
                f"a fresh-server drill was asked for, but {why}",
                hint="install the server package of that version, or drill on the same server "
                "(restore.drill.fresh_server: auto or false, or `drill --same-server`)",
            )
        return SAME_SERVER, None, why
    return FRESH_SERVER, bin_dir, ""
