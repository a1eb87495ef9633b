"""The restored server's side of a point-in-time recovery: the binaries of its version, its
port, its state, its log, why it stopped, and stopping it."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import subprocess
from pathlib import Path

from backup_pipelines.engine.errors import RefusedError
from backup_pipelines.engine.postgres import find_tools
from backup_pipelines.engine.processes import pid_alive


class PitrPortInUseError(RefusedError):
    """The restored server could not listen on its port: refused before it is started."""


def check_port_free(port: int, *, setting: str = "--port", origin: str = "") -> None:
    """Refuse a port PostgreSQL could not listen on, before anything is extracted or started.

    Binds it the way the server does (SO_REUSEADDR, every IPv4 address): on Linux that fails
    exactly when something already listens on the port, on any address.
    """
    if not 1 <= port <= 65535:
        raise PitrPortInUseError(
            f"port {port} is not a TCP port", hint=f"pass {setting} between 1024 and 65535"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PitrPortInUseError(
                    f"port {port}{origin} is already in use on this host (another server listens "
                    "there): the restored server could not start on it",
                    hint=f"pick a free port with {setting} (`ss -ltn` lists the ones in use), "
                    "or stop what listens there; nothing was changed",
                ) from None
            if exc.errno == errno.EACCES:
                raise PitrPortInUseError(
                    f"port {port} needs privileges the server does not have",
                    hint=f"pass {setting} 1024 or above",
                ) from None
            raise


def configured_port(bin_dir: Path, data_dir: Path, user: str) -> int | None:
    """The port a data directory's own configuration makes its server listen on."""
    shown = subprocess.run(
        as_server_user([str(bin_dir / "postgres"), "-D", str(data_dir), "-C", "port"], user),
        capture_output=True,
        text=True,
        check=False,
    )
    with contextlib.suppress(ValueError):
        return int(shown.stdout.strip())
    return None


def server_bin_dir(major: int, configured: Path | None) -> Path:
    """Server binaries of exactly this major version (a data directory only runs on its own);
    a clear ToolError naming the package to install when they are missing."""
    return Path(find_tools(major, configured).path("pg_ctl")).parent


def as_server_user(argv: list[str], user: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *argv]
    return argv


def controldata_state(bin_dir: Path, data_dir: Path) -> str:
    result = subprocess.run(
        [str(bin_dir / "pg_controldata"), str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    for line in result.stdout.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return pid_alive(pid)


# What a server that failed to start (or to finish recovery) says, and what to do about it.
_FAILURE_LINE = re.compile(r"\b(FATAL|PANIC):\s+(.*)$")
# What the postmaster prints before its log is set up (a missing configuration file, say).
_EARLY_LINE = re.compile(r"^(?:\S*/)?postgres: (.*)$")
_DETAIL_LINE = re.compile(r"\b(?:LOG|ERROR|WARNING):\s+(could not .*)$")
# Clients (pg_ctl -w among them) knocking during start-up: not why a server stopped.
_CLIENT_FATALS = ("the database system is", "terminating connection", "password authentication")
_FAILURE_HINTS = (
    (
        ("Address already in use", "could not create any TCP/IP sockets", "lock file"),
        "another server listens on that port or socket: restore again with a free --port",
    ),
    (
        ("recovery ended before configured recovery target was reached",
         "could not locate required checkpoint record", "requested timeline"),
        "the WAL up to the target is not in the archive (a gap, or not archived yet): "
        "check `backup-pipelines wal-status <target>` and pg_stat_archiver, then restore again",
    ),
    (
        ("server configuration file", "pg_hba.conf", "pg_ident.conf", "configuration file"),
        "the restored copy's configuration is incomplete: fix the file named above in the "
        "restored data directory (base backups taken by this version capture the files kept "
        "outside the data directory, e.g. Debian's /etc/postgresql/<ver>/<cluster>/)",
    ),
)  # fmt: skip


def server_log_lines(log_path: Path, data_dir: Path) -> list[str]:
    """The tail of the server's log: our ``-l`` file, then the newest file in ``log/`` (where
    a configuration with ``logging_collector = on`` sends everything after start-up)."""
    candidates = [log_path]
    with contextlib.suppress(OSError):
        collected = [p for p in (data_dir / "log").iterdir() if p.is_file()]
        candidates += sorted(collected, key=lambda p: p.stat().st_mtime)[-1:]
    lines: list[str] = []
    for path in candidates:
        with contextlib.suppress(OSError):
            lines += path.read_text(errors="replace").splitlines()[-200:]
    return lines


def server_failure_reason(lines: list[str], pg_ctl_output: str = "") -> str | None:
    """The server's own reason for stopping: its last FATAL/PANIC line, with the "could not ..."
    line just before it when there is one (e.g. which address was in use); else pg_ctl's error."""
    for index in range(len(lines) - 1, -1, -1):
        match = _FAILURE_LINE.search(lines[index])
        if not match or match.group(2).startswith(_CLIENT_FATALS):
            continue
        reason = f"{match.group(1)}: {' '.join(match.group(2).split())}"
        details = [
            " ".join(found.group(1).split())
            for previous in lines[max(0, index - 6) : index]
            if (found := _DETAIL_LINE.search(previous))
        ]
        # Prefer the line carrying the operating system's error ("...": Address already in use).
        detail = next((d for d in details if '": ' in d), details[-1] if details else None)
        return f"{reason} ({detail})" if detail else reason
    for line in reversed(lines):
        if match := _EARLY_LINE.match(line.strip()):
            return " ".join(match.group(1).split())
    for line in reversed(pg_ctl_output.splitlines()):
        if line.strip() and "Examine the log output" not in line:
            return " ".join(line.split())
    return None


def failure_hint(reason: str | None) -> str | None:
    for needles, hint in _FAILURE_HINTS:
        if reason and any(needle in reason for needle in needles):
            return hint
    return None


def left_on_disk(data_dir: Path, log_path: Path) -> str:
    """What a failed restore leaves, and what may be done with it."""
    return (
        f"left on disk: {data_dir}, the restored copy (server stopped, its log is {log_path}); "
        "it is a new cluster, not the source, so it is safe to delete (rm -rf it), or keep it to "
        "read the log and start it again with pg_ctl once the cause is fixed (the recovery "
        "settings are in its postgresql.auto.conf)"
    )


def stop_server(data_dir: Path, bin_dir: Path, user: str, mode: str = "fast") -> None:
    if not postmaster_running(data_dir):
        return
    subprocess.run(
        as_server_user(
            [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", mode, "-w", "stop"], user
        ),
        capture_output=True,
        check=False,
    )
