"""Point-in-time recovery (PostgreSQL 12+): restore a base backup into a NEW data directory,
configure recovery to replay archived WAL up to a moment, optionally start it and wait until it
is promoted; and the automated drill that proves all of that regularly.

Recovery settings go into ``postgresql.auto.conf`` with an empty ``recovery.signal`` (there is no
``recovery.conf`` since PostgreSQL 12; a server refuses to start with one):
``restore_command`` (our ``wal-fetch``), ``recovery_target_time`` and
``recovery_target_action = 'promote'`` (the default, ``pause``, would leave it read-only).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.base import BaseBackupMeta, list_base_backups
from backup_pipelines.engine.backup.base_reader import chown_tree, empty_dir, extract_base_backup
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.errors import (
    BackupPipelinesError,
    ConfigError,
    RefusedError,
    RestoreFailedError,
)
from backup_pipelines.engine.fsutil import ensure_private_dir
from backup_pipelines.engine.postgres import ConnectionInfo, connect, server_major
from backup_pipelines.engine.processes import pid_alive
from backup_pipelines.engine.wal import (
    DEFAULT_SEGMENT_SIZE,
    WalArchive,
    WalGap,
    conf_quote,
    find_gaps,
    list_wal,
    newest_segment,
    parse_lsn,
    pitr_settings,
    prune_wal,
    restore_command,
    segment_number,
    wal_archive_for,
)

logger = logging.getLogger("backup_pipelines")

RESTORE_LOG_NAME = "pitr_restore.log"
DRILL_HBA_NAME = "drill_pg_hba.conf"
# md5 accepts both md5 and SCRAM password hashes; only 127.0.0.1 and the 0700 socket folder.
DRILL_HBA = "local all all peer\nhost all all 127.0.0.1/32 md5\n"
_STOP_RE = re.compile(
    r"recovery stopping (?:before|after) (?:commit|abort) of transaction (\d+), time (.+)"
)
_LAST_TX_RE = re.compile(r"last completed transaction was at log time (.+)")
_TIMELINE_RE = re.compile(r"selected new timeline ID: (\d+)")


class PitrRangeError(RestoreFailedError, RefusedError):
    """The requested moment cannot be recovered to with the backups and WAL at hand."""


class PitrPortInUseError(RefusedError):
    """The restored server could not listen on its port: refused before it is started."""


# --- what can be recovered ------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryWindow:
    earliest: datetime | None
    latest: datetime | None
    newest_segment: str | None

    def describe(self, tz: str = "UTC") -> str:
        if self.earliest is None:
            return "nothing (no base backup yet: take one with `backup-pipelines base-backup <target>`)"
        if self.latest is None:
            return "nothing (no WAL archived yet: check archive_command and pg_stat_archiver)"
        zone = ZoneInfo(tz)
        return (
            f"{self.earliest.astimezone(zone).isoformat(sep=' ', timespec='seconds')} .. "
            f"{self.latest.astimezone(zone).isoformat(sep=' ', timespec='seconds')}"
        )


def usable_base_backups(target: Target) -> list[tuple[BackupArtifact, BaseBackupMeta]]:
    return [(a, m) for a, m in list_base_backups(target) if a.usable]


def recovery_window(target: Target, archive: WalArchive) -> RecoveryWindow:
    """From the end of the oldest usable base backup to the newest archived WAL."""
    backups = usable_base_backups(target)
    earliest = min((m.consistent_at for _, m in backups), default=None)
    newest = newest_segment(list_wal(archive))
    latest = None
    if newest is not None:
        record = archive.primary.read_record(newest.name)
        # The segment file's own mtime is when the server last wrote into it; later commits
        # are in a segment that is not archived yet.
        latest = (record.source_mtime or record.archived_at) if record else newest.archived_at
    return RecoveryWindow(earliest, latest, newest.name if newest else None)


def parse_target_time(text: str, timezone: str = "UTC") -> datetime:
    """``2026-11-24 15:30:00`` (in the targets file's timezone), or ISO 8601 with an offset."""
    cleaned = text.strip().replace("T", " ")
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ConfigError(
            f"--to {text!r} is not a timestamp",
            hint="use e.g. '2026-11-24 15:30:00' (targets-file timezone) or '2026-11-24T15:30:00+01:00'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment.astimezone(UTC)


def choose_base_backup(
    target: Target, archive: WalArchive, to: datetime, timezone: str = "UTC"
) -> tuple[BackupArtifact, BaseBackupMeta]:
    """The newest usable base backup that was consistent before ``to``; refuses moments outside
    the recoverable window, naming the window."""
    window = recovery_window(target, archive)
    wanted = to.astimezone(ZoneInfo(timezone)).isoformat(sep=" ", timespec="seconds")
    if (
        window.earliest is None
        or window.latest is None
        or not (window.earliest <= to <= window.latest)
    ):
        raise PitrRangeError(
            f"cannot recover target '{target.name}' to {wanted}: the recoverable range is "
            f"{window.describe(timezone)}",
            hint="pick a time inside that range (it starts when the oldest base backup finished "
            "and ends with the newest archived WAL segment)",
        )
    candidates = [(a, m) for a, m in usable_base_backups(target) if m.consistent_at <= to]
    artifact, meta = max(candidates, key=lambda pair: pair[1].consistent_at)
    return artifact, meta


# --- restoring ------------------------------------------------------------------------------


@dataclass
class PitrRestoreResult:
    target: str
    data_dir: Path
    base_backup: str
    target_time: datetime
    started: bool = False
    promoted: bool = False
    reached: datetime | None = None
    stopped_before_xid: int | None = None
    timeline: int | None = None
    port: int | None = None
    restore_seconds: float = 0.0
    log_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def rpo_seconds(self) -> float | None:
        if self.reached is None:
            return None
        return round((self.target_time - self.reached).total_seconds(), 3)

    def summary(self) -> str:
        parts = [
            f"restored '{self.target}' from {self.base_backup} into {self.data_dir}",
            f"recovery target {self.target_time.isoformat()}",
        ]
        if self.started:
            state = "promoted, accepting writes" if self.promoted else "NOT promoted"
            parts.append(f"server on port {self.port}: {state}")
            if self.reached is not None:
                parts.append(
                    f"last replayed transaction at {self.reached.isoformat()} "
                    f"({self.rpo_seconds:.3f}s before the target)"
                )
            if self.timeline is not None:
                parts.append(f"new timeline {self.timeline}")
        else:
            parts.append("not started: start it with pg_ctl to replay WAL to the target")
        parts.append(f"{self.restore_seconds:.1f}s")
        return "; ".join(parts)


def check_data_dir(data_dir: Path) -> None:
    """Refuse anything but a new or empty folder: PITR never writes into an existing cluster."""
    if data_dir.exists():
        if not data_dir.is_dir():
            raise ConfigError(f"--data-dir {data_dir} exists and is not a folder")
        if any(data_dir.iterdir()):
            raise ConfigError(
                f"--data-dir {data_dir} is not empty: refusing to write into an existing data directory",
                hint="pass a new (or empty) folder; PITR never overwrites a cluster",
            )


def _prepare_data_dir(data_dir: Path) -> bool:
    """Returns True when we created the folder (so a failure removes it again)."""
    check_data_dir(data_dir)
    if data_dir.exists():
        return False
    # Missing parents get 0711: the server's OS user must reach the data directory.
    ensure_private_dir(data_dir, what="--data-dir", parent_mode=0o711)
    return True


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
        _as_server_user([str(bin_dir / "postgres"), "-D", str(data_dir), "-C", "port"], user),
        capture_output=True,
        text=True,
        check=False,
    )
    with contextlib.suppress(ValueError):
        return int(shown.stdout.strip())
    return None


def server_bin_dir(major: int, configured: Path | None) -> Path:
    """Server binaries of exactly this major version (a data directory only runs on its own)."""
    candidates = [configured] if configured else []
    candidates += [Path(f"/usr/lib/postgresql/{major}/bin"), Path(f"/usr/pgsql-{major}/bin")]
    for candidate in candidates:
        if candidate and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RestoreFailedError(
        f"PostgreSQL {major} server binaries (pg_ctl) not found",
        hint=f"install postgresql-{major} or set pg_bin_dir for this target",
    )


def recovery_settings(
    config: ProjectConfig,
    target: Target,
    to: datetime,
    *,
    port: int | None,
    drill_socket_dir: Path | None = None,
    keep_archiving: bool = False,
) -> dict[str, str]:
    settings = {
        "restore_command": conf_quote(restore_command(config, target)),
        "recovery_target_time": conf_quote(to.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")),
        "recovery_target_action": "'promote'",
        "recovery_target_inclusive": "on",
    }
    if not keep_archiving:
        # A restored copy must not push a new timeline into the production archive.
        settings["archive_mode"] = "'off'"
    if port is not None:
        settings["port"] = str(port)
    if drill_socket_dir is not None:
        settings.update(
            listen_addresses="'127.0.0.1'",
            unix_socket_directories=conf_quote(str(drill_socket_dir)),
            # The copy's own pg_hba.conf may not admit 127.0.0.1; passwords still apply.
            hba_file=conf_quote(str(drill_socket_dir / DRILL_HBA_NAME)),
            shared_buffers="'128MB'",
            logging_collector="off",
        )
    return settings


def _as_server_user(argv: list[str], user: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *argv]
    return argv


def _controldata_state(bin_dir: Path, data_dir: Path) -> str:
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


def _postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return pid_alive(pid)


def _parse_log_time(text: str) -> datetime | None:
    cleaned = text.strip()
    match = re.match(
        r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?)([+-]\d{2}(?::?\d{2})?)?", cleaned
    )
    if not match:
        return None
    stamp, offset = match.group(1), match.group(2) or "+00"
    if len(offset) == 3:
        offset += ":00"
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(f"{stamp}{offset}").astimezone(UTC)
    return None


def _read_recovery_report(log_path: Path, result: PitrRestoreResult) -> None:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return
    if match := _STOP_RE.search(text):
        result.stopped_before_xid = int(match.group(1))
    if matches := _LAST_TX_RE.findall(text):
        result.reached = _parse_log_time(matches[-1])
    if matches := _TIMELINE_RE.findall(text):
        result.timeline = int(matches[-1])


# What a server that failed to start (or to finish recovery) says, and what to do about it.
_FAILURE_LINE = re.compile(r"\b(FATAL|PANIC):\s+(.*)$")
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
)  # fmt: skip


def _server_log_lines(log_path: Path, data_dir: Path) -> list[str]:
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
    for line in reversed(pg_ctl_output.splitlines()):
        if line.strip() and "Examine the log output" not in line:
            return " ".join(line.split())
    return None


def _failure_hint(reason: str | None) -> str | None:
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


def start_and_wait(
    data_dir: Path,
    bin_dir: Path,
    user: str,
    log_path: Path,
    result: PitrRestoreResult,
    timeout_seconds: float,
) -> None:
    """Start the restored server and wait until recovery ended and it was promoted.

    When the server stops on its own (it could not start, or recovery failed) the error carries
    its FATAL line; when it is still recovering at the deadline it is stopped. Either way the
    error says what is left on disk.
    """
    argv = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_path), "-w", "-t",
            str(int(max(timeout_seconds, 10))), "start"]  # fmt: skip
    started = subprocess.run(
        _as_server_user(argv, user), capture_output=True, text=True, check=False
    )
    result.started = True
    deadline = time.monotonic() + timeout_seconds
    timed_out = False
    while True:
        if (
            _controldata_state(bin_dir, data_dir) == "in production"
            and not (data_dir / "recovery.signal").exists()
        ):
            result.promoted = True
            break
        if not _postmaster_running(data_dir):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.3)
    _read_recovery_report(log_path, result)
    if result.promoted:
        return
    state = _controldata_state(bin_dir, data_dir)
    stop_server(data_dir, bin_dir, user, "immediate")
    reason = server_failure_reason(
        _server_log_lines(log_path, data_dir), started.stdout + started.stderr
    )
    if timed_out:
        what = (
            f"the restored server did not finish recovery within {timeout_seconds:.0f}s "
            f"(state: {state}) and was stopped"
        )
        hint = _failure_hint(reason) or (
            "recovery was still replaying WAL: restore again with a longer "
            "pitr.drill_timeout_minutes, or check that wal-fetch can read the archive"
        )
    else:
        what = f"the restored server on port {result.port or 'from its configuration'} stopped"
        what += " before it was promoted: " + (reason or f"no reason in its log (state: {state})")
        hint = _failure_hint(reason) or f"read the server log {log_path}"
    raise RestoreFailedError(what, hint=f"{hint}; {left_on_disk(data_dir, log_path)}")


def stop_server(data_dir: Path, bin_dir: Path, user: str, mode: str = "fast") -> None:
    if not _postmaster_running(data_dir):
        return
    subprocess.run(
        _as_server_user(
            [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", mode, "-w", "stop"], user
        ),
        capture_output=True,
        check=False,
    )


def pitr_restore(
    config: ProjectConfig,
    target: Target,
    to: datetime,
    data_dir: Path,
    *,
    port: int | None = None,
    start: bool = False,
    keep_archiving: bool = False,
    archive: WalArchive | None = None,
    drill_socket_dir: Path | None = None,
    timeout_seconds: float | None = None,
    log: Any = None,
) -> PitrRestoreResult:
    """Restore ``target`` as it was at ``to`` into the new folder ``data_dir``."""
    log = log or logger
    settings = pitr_settings(target)
    archive = archive or wal_archive_for(target)
    data_dir = data_dir.expanduser().absolute()
    check_data_dir(data_dir)
    if start and port is not None:
        check_port_free(port)
    artifact, meta = choose_base_backup(target, archive, to, config.timezone)
    if meta.server_version_num < 120000:
        raise RestoreFailedError(
            f"{artifact.path.name} is from PostgreSQL {meta.server_version}; this tool configures "
            "recovery the PostgreSQL 12+ way (recovery.signal) only"
        )
    gaps = find_gaps(
        list_wal(archive),
        segment_number(meta.first_wal_segment, meta.wal_segment_size),
        meta.wal_segment_size,
    )
    created = _prepare_data_dir(data_dir)
    clock = time.monotonic()
    result = PitrRestoreResult(target.name, data_dir, artifact.path.name, to, port=port)
    for gap in gaps:
        result.warnings.append(
            f"WAL archive gap: {gap.count} segment(s) {gap.first_missing}..{gap.last_missing} "
            "missing; recovery cannot replay past them"
        )
        log.warning(result.warnings[-1])
    log.info(
        f"PITR of '{target.name}' to {to.isoformat()}: base backup {artifact.path.name} "
        f"(consistent at {meta.consistent_at.isoformat()}, WAL from {meta.first_wal_segment})"
    )
    bin_dir = server_bin_dir(server_major(meta.server_version_num), target.settings.pg_bin_dir)
    try:
        extract_base_backup(artifact, meta, data_dir)
        for leftover in ("recovery.conf", "standby.signal", "postmaster.pid", "postmaster.opts"):
            with contextlib.suppress(FileNotFoundError):
                (data_dir / leftover).unlink()
        (data_dir / "recovery.signal").write_bytes(b"")
        lines = recovery_settings(
            config,
            target,
            to,
            port=port,
            drill_socket_dir=drill_socket_dir,
            keep_archiving=keep_archiving,
        )
        with (data_dir / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                f"\n# backup-pipelines pitr-restore {datetime.now(UTC).isoformat(timespec='seconds')}: "
                f"'{target.name}' to {to.isoformat()} from {artifact.path.name}\n"
            )
            for key, value in lines.items():
                conf.write(f"{key} = {value}\n")
        chown_tree(data_dir, settings.server_os_user)
        # The one folder whose mode we set even when the operator made it (empty): it is now a
        # data directory, and PostgreSQL refuses to start on one other users can read.
        data_dir.chmod(0o700)
        if start and port is None:
            # The copy listens where the backed-up configuration says: on the source's own
            # host that is the source's port.
            result.port = configured_port(bin_dir, data_dir, settings.server_os_user)
            if result.port is not None:
                check_port_free(
                    result.port,
                    origin=" (from the backed-up configuration, as no port was given)",
                )
    except BaseException:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            empty_dir(data_dir)
        raise
    result.log_path = data_dir / RESTORE_LOG_NAME
    if start:
        try:
            start_and_wait(
                data_dir,
                bin_dir,
                settings.server_os_user,
                result.log_path,
                result,
                timeout_seconds or settings.drill_timeout_minutes * 60,
            )
        except BaseException:
            stop_server(data_dir, bin_dir, settings.server_os_user, "immediate")
            raise
    result.restore_seconds = round(time.monotonic() - clock, 3)
    log.info(result.summary())
    return result


# --- the drill --------------------------------------------------------------------------------


@dataclass
class DrillResult:
    target: str
    passed: bool
    message: str
    target_time: datetime | None = None
    reached: datetime | None = None
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    base_backup: str | None = None
    timeline: int | None = None
    databases_checked: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _wait_archived(info: ConnectionInfo, archive: WalArchive, segment: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if archive.primary.read_record(segment) is not None:
            return
        time.sleep(0.3)
    raise RestoreFailedError(
        f"WAL segment {segment} was not archived within {timeout:.0f}s",
        hint="check pg_stat_archiver.last_failed_wal and the server log for archive_command errors",
    )


def switch_and_wait_archived(info: ConnectionInfo, archive: WalArchive, timeout: float) -> str:
    """Close the current WAL segment and wait until it is in the archive; returns its name."""
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        try:
            # pg_switch_wal() returns the end of the segment it just completed (or, when nothing
            # was written since the last switch, the end of the last completed one).
            cur.execute("SELECT pg_walfile_name(pg_switch_wal())")
        except Exception as exc:
            logger.warning(
                f"pg_switch_wal() is not allowed for this role ({type(exc).__name__}); waiting for "
                "archive_timeout to close the segment instead"
            )
            cur.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        row = cur.fetchone()
        assert row is not None
        segment = str(row[0])
    _wait_archived(info, archive, segment, timeout)
    return segment


def _txid_status(cur: Any, xid: int) -> str:
    try:
        cur.execute("SELECT txid_status(%s)", (xid,))
        row = cur.fetchone()
        return str(row[0]) if row and row[0] is not None else "unknown"
    except Exception as exc:
        # "transaction ID ... is in the future": the restored cluster never saw it.
        if "future" in str(exc):
            return "never seen"
        raise


def pitr_drill(config: ProjectConfig, target: Target, *, log: Any = None) -> DrillResult:
    """Restore to a fresh point on a scratch port and folder, prove the result, clean up.

    The drill marks the moment with two empty transactions on the live server (one before the
    target time, one after), archives the WAL, restores to the target and then checks that the
    first one is committed in the copy and the second one is not: the copy stopped exactly at the
    target. It also checks the copy was promoted, is writable and every database opens.
    """
    log = log or logger
    settings = pitr_settings(target)
    info = ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}'")
    archive = wal_archive_for(target)
    timeout = settings.drill_timeout_minutes * 60
    parent = settings.drill_dir or Path(tempfile.gettempdir())
    # Holds only mkdtemp folders (0711 below): its own sharing is not a concern.
    ensure_private_dir(parent, what="pitr.drill_dir", parent_mode=0o711, warn_shared=False)
    scratch = Path(tempfile.mkdtemp(prefix=f"pitr-drill-{target.name}-", dir=parent))
    scratch.chmod(0o711)
    port = settings.drill_port or free_port()
    data_dir = scratch / "data"
    socket_dir = ensure_private_dir(scratch / "sock", what="drill socket folder")
    (socket_dir / DRILL_HBA_NAME).write_text(DRILL_HBA)
    chown_tree(socket_dir, settings.server_os_user)
    result = DrillResult(target.name, False, "not run")
    bin_dir: Path | None = None
    try:
        if settings.drill_port is not None:
            check_port_free(port, setting="pitr.drill_port", origin=" (pitr.drill_port)")
        with connect(info, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            before = int(cur.fetchone()[0])  # type: ignore[index]
            time.sleep(0.05)
            cur.execute("SELECT clock_timestamp()")
            to: datetime = cur.fetchone()[0]  # type: ignore[index]
            time.sleep(0.05)
            cur.execute("SELECT txid_current()")
            after = int(cur.fetchone()[0])  # type: ignore[index]
        result.target_time = to
        segment = switch_and_wait_archived(info, archive, timeout)
        log.info(f"drill: target {to.isoformat()}, WAL archived up to {segment}; restoring")
        restored = pitr_restore(
            config,
            target,
            to,
            data_dir,
            port=port,
            start=True,
            archive=archive,
            drill_socket_dir=socket_dir,
            timeout_seconds=timeout,
            log=log,
        )
        bin_dir = server_bin_dir(
            server_major(usable_base_backups(target)[0][1].server_version_num),
            target.settings.pg_bin_dir,
        )
        result.base_backup = restored.base_backup
        result.rto_seconds = restored.restore_seconds
        result.timeline = restored.timeline
        params = {k: v for k, v in info.params.items() if k not in ("hostaddr", "service")}
        copy = ConnectionInfo({**params, "host": "127.0.0.1", "port": str(port)})
        with connect(copy, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp()")
            in_recovery, replayed = cur.fetchone()  # type: ignore[misc]
            before_status = _txid_status(cur, before)
            after_status = _txid_status(cur, after)
            cur.execute(
                "CREATE TEMP TABLE drill_write_test (id int); INSERT INTO drill_write_test VALUES (1)"
            )
            cur.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
            databases = [str(r[0]) for r in cur.fetchall()]
        for database in databases:
            with connect(copy.with_dbname(database)) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_class")
                cur.fetchone()
            result.databases_checked += 1
        result.reached = restored.reached or replayed
        if result.reached is not None:
            result.rpo_seconds = round((to - result.reached).total_seconds(), 3)
        problems = []
        if in_recovery:
            problems.append("the copy is still in recovery (not promoted)")
        if before_status != "committed":
            problems.append(
                f"the transaction committed before the target is {before_status} in the copy"
            )
        if after_status == "committed":
            problems.append(
                "the transaction committed after the target is committed in the copy: "
                "recovery went past the target"
            )
        result.details = {
            "marker_before": f"{before}: {before_status}",
            "marker_after": f"{after}: {after_status}",
            "scratch_port": port,
            "segment_archived": segment,
        }
        result.passed = not problems
        result.message = (
            "; ".join(problems)
            if problems
            else f"restored to {to.isoformat()} in {result.rto_seconds:.1f}s from {restored.base_backup}; "
            f"stopped exactly at the target (marker before committed, marker after not); "
            f"promoted, writable, {len(databases)} databases open"
        )
    except BackupPipelinesError as exc:
        result.message = exc.message
    except Exception as exc:  # a drill reports, it does not crash the run
        result.message = f"{type(exc).__name__}: {exc}"
    finally:
        if bin_dir is not None:
            with contextlib.suppress(Exception):
                stop_server(data_dir, bin_dir, settings.server_os_user, "immediate")
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        f"PITR drill of '{target.name}': {'PASSED' if result.passed else 'FAILED'}: {result.message}"
    )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- archive health (the wal_archive sensor and check) ------------------------------------------


@dataclass
class ArchiveHealth:
    """What monitoring needs to know about a target's WAL archive right now."""

    target: str
    problems: list[str]
    archive: str
    segments: int = 0
    newest_segment: str | None = None
    newest_archived_at: datetime | None = None
    age_seconds: float | None = None
    lag_limit_seconds: float = 0.0
    first_needed_segment: str | None = None
    gaps: list[WalGap] = field(default_factory=list)
    unarchived_segments: int | None = None
    archiver: dict[str, Any] = field(default_factory=dict)
    server_error: str | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.healthy:
            age = f"{self.age_seconds:.0f}s" if self.age_seconds is not None else "?"
            return (
                f"WAL archive of '{self.target}' healthy: {self.segments} segments, newest "
                f"{self.newest_segment} archived {age} ago, no gaps since {self.first_needed_segment}"
            )
        return f"WAL archive of '{self.target}' UNHEALTHY: " + "; ".join(self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "healthy": self.healthy,
            "problems": self.problems,
            "archive": self.archive,
            "segments": self.segments,
            "newest_segment": self.newest_segment,
            "newest_archived_at": self.newest_archived_at.isoformat()
            if self.newest_archived_at
            else None,
            "age_seconds": self.age_seconds,
            "lag_limit_seconds": self.lag_limit_seconds,
            "first_needed_segment": self.first_needed_segment,
            "gaps": [g.__dict__ for g in self.gaps],
            "unarchived_segments": self.unarchived_segments,
            "archiver": self.archiver,
            "server_error": self.server_error,
        }


def _archiver_stats(info: ConnectionInfo, segment_size: int) -> tuple[dict[str, Any], int | None]:
    info = ConnectionInfo({**info.params, "connect_timeout": "5"})
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
            "last_failed_wal, last_failed_time FROM pg_stat_archiver"
        )
        row = cur.fetchone()
        assert row is not None
        stats = dict(
            zip(
                ("archived_count", "last_archived_wal", "last_archived_time", "failed_count",
                 "last_failed_wal", "last_failed_time"),
                row,
                strict=True,
            )
        )  # fmt: skip
        cur.execute("SELECT pg_is_in_recovery()")
        in_recovery = bool(cur.fetchone()[0])  # type: ignore[index]
        current_segno = None
        if not in_recovery:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            current_segno = parse_lsn(str(cur.fetchone()[0])) // segment_size  # type: ignore[index]
    return stats, current_segno


def archive_health(
    target: Target, *, archive: WalArchive | None = None, now: datetime | None = None
) -> ArchiveHealth:
    settings = pitr_settings(target)
    archive = archive or wal_archive_for(target)
    now = now or datetime.now(UTC)
    health = ArchiveHealth(
        target.name,
        [],
        archive.describe(),
        lag_limit_seconds=settings.archive_lag_limit_minutes * 60,
    )
    try:
        entries = list_wal(archive)
    except BackupPipelinesError as exc:
        health.problems.append(f"the WAL archive cannot be listed: {exc.message}")
        return health
    backups = usable_base_backups(target)
    oldest = backups[-1][1] if backups else None
    segment_size = oldest.wal_segment_size if oldest else DEFAULT_SEGMENT_SIZE
    segments = [e for e in entries if e.kind == "segment"]
    health.segments = len(segments)
    newest = newest_segment(entries)
    if newest is not None:
        health.newest_segment = newest.name
        health.newest_archived_at = newest.archived_at
        if newest.archived_at is not None:
            health.age_seconds = round((now - newest.archived_at).total_seconds(), 1)
    start = None
    if oldest is not None:
        health.first_needed_segment = oldest.first_wal_segment
        start = segment_number(oldest.first_wal_segment, segment_size)
    elif segments:
        health.first_needed_segment = min(segments, key=lambda e: e.name).name
    health.gaps = find_gaps(entries, start, segment_size)
    for gap in health.gaps:
        health.problems.append(
            f"gap in the WAL archive: {gap.count} segment(s) {gap.first_missing}..{gap.last_missing} "
            "missing (point-in-time recovery cannot pass them; take a new base backup)"
        )
    try:
        stats, current_segno = _archiver_stats(
            ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}'"), segment_size
        )
        health.archiver = {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in stats.items()
        }
        failed_at, archived_at = stats["last_failed_time"], stats["last_archived_time"]
        if failed_at is not None and (archived_at is None or failed_at > archived_at):
            health.problems.append(
                f"archive_command is failing: {stats['last_failed_wal']} failed at "
                f"{failed_at.isoformat()} ({stats['failed_count']} failures since the statistics "
                "reset); see the server log for wal-push's message"
            )
        if current_segno is not None and newest is not None:
            health.unarchived_segments = max(
                current_segno - segment_number(newest.name[:24], segment_size) - 1, 0
            )
    except BackupPipelinesError as exc:
        health.server_error = exc.message
    if newest is None:
        health.problems.append(
            "nothing archived yet: check archive_mode/archive_command (`backup-pipelines wal-setup`)"
        )
    elif health.age_seconds is not None and health.age_seconds > health.lag_limit_seconds:
        waiting = health.unarchived_segments
        if waiting is None or waiting > 0:
            health.problems.append(
                f"archive lag: the newest archived segment {newest.name} is "
                f"{health.age_seconds / 60:.1f} min old (limit {settings.archive_lag_limit_minutes:g} min)"
                + (f" and {waiting} finished segment(s) wait to be archived" if waiting else "")
                + (f"; server not reachable: {health.server_error}" if health.server_error else "")
            )
    return health


# --- retention: base backups by the calendar policy, WAL only before the oldest kept one -------


@dataclass
class PitrRetentionReport:
    kept: list[str]
    pruned: list[str]
    wal_removed: list[str]
    keep_wal_from: str | None
    held: str | None = None
    errors: list[str] = field(default_factory=list)
    # Set when "now" is implausible against the base backups: nothing (WAL included) was pruned.
    clock_problem: str | None = None


def apply_pitr_retention(
    config: ProjectConfig,
    target: Target,
    *,
    archive: WalArchive | None = None,
    remote_storage: Any = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PitrRetentionReport:
    """Prune base backups with the target's calendar retention (the same planner as logical
    backups), then WAL older than the first segment the oldest *kept* base backup needs.

    WAL is never pruned when no base backup is kept, and nothing newer than that first segment
    is ever touched, so every kept base backup can still be recovered to any later moment.
    When the clock cannot be trusted (see ``engine.retention``) nothing is pruned at all.
    """
    from backup_pipelines.engine.retention import (
        BASE_BACKUP_INTERVAL,
        RetentionPolicy,
        apply_retention,
        build_inventory,
        max_gap_for,
    )
    from backup_pipelines.engine.storage import list_stored_backups

    archive = archive or wal_archive_for(target)
    now = now or datetime.now(UTC)
    local = [a for a, _ in list_base_backups(target)]
    remote = list_stored_backups(remote_storage) if remote_storage is not None else []
    remote = [a for a in remote if a.meta.kind == "base"]
    retention = target.settings.retention
    policy = RetentionPolicy(retention.daily, retention.weekly, retention.monthly)
    report = apply_retention(
        build_inventory(local, remote),
        policy,
        now=now,
        tz=config.timezone,
        remote_storage=remote_storage,
        dry_run=dry_run,
        max_gap=max_gap_for(BASE_BACKUP_INTERVAL),
    )
    kept = [e for e in report.entries if e.decision is not None and e.decision.keep]
    result = PitrRetentionReport(
        kept=[e.name for e in kept],
        pruned=[e.name for e in report.pruned],
        wal_removed=[],
        keep_wal_from=None,
        held=report.plan.hold_reason,
        errors=list(report.errors),
        clock_problem=report.plan.clock_problem,
    )
    if result.clock_problem is not None:
        return result
    kept_meta = []
    for entry in kept:
        artifact = entry.local or entry.remote
        if artifact is not None:
            kept_meta.append(BaseBackupMeta.model_validate(artifact.meta.model_dump()))
    if not kept_meta:
        return result
    oldest = min(kept_meta, key=lambda m: parse_lsn(m.start_lsn))
    result.keep_wal_from = oldest.first_wal_segment
    if not dry_run:
        result.wal_removed = prune_wal(
            archive,
            segment_number(oldest.first_wal_segment, oldest.wal_segment_size),
            oldest.wal_segment_size,
        )
    return result


def base_backup_offsite_storage(target: Target, *, client: Any = None) -> Any:
    """Where base backups are copied offsite: ``s3://<bucket>/<prefix>/<target>-pitr/base/``.

    A sibling of the logical backups' ``<prefix>/<target>/`` folder (target names cannot contain
    ``-``), so logical retention, listings and "restore latest" never see a base backup.
    """
    from backup_pipelines.engine.offsite import offsite_storage

    storage = offsite_storage(target, client=client)
    parts = (target.settings.offsite.prefix.strip("/"), f"{target.name}-pitr", "base")
    storage.prefix = "/".join(p for p in parts if p)
    return storage
