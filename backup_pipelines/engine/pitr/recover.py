"""Point-in-time recovery (PostgreSQL 12+): restore a base backup into a NEW data directory,
configure recovery to replay archived WAL up to a moment, optionally start it and wait until it
is promoted.

Recovery settings go into ``postgresql.auto.conf`` with an empty ``recovery.signal`` (there is no
``recovery.conf`` since PostgreSQL 12; a server refuses to start with one):
``restore_command`` (our ``wal-fetch``), ``recovery_target_time`` and
``recovery_target_action = 'promote'`` (the default, ``pause``, would leave it read-only)."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backup_pipelines.engine.backup.base_reader import chown_tree, empty_dir, extract_base_backup
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.errors import ConfigError, RestoreFailedError
from backup_pipelines.engine.fsutil import ensure_private_dir
from backup_pipelines.engine.pitr.server import (
    as_server_user,
    check_port_free,
    configured_port,
    controldata_state,
    failure_hint,
    left_on_disk,
    postmaster_running,
    server_bin_dir,
    server_failure_reason,
    server_log_lines,
    stop_server,
)
from backup_pipelines.engine.pitr.server_config import install_server_config
from backup_pipelines.engine.pitr.window import choose_base_backup
from backup_pipelines.engine.postgres import server_major
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
from backup_pipelines.engine.wal import (
    WalArchive,
    conf_quote,
    find_gaps,
    list_wal,
    pitr_settings,
    restore_command,
    segment_number,
    wal_archive_for,
)

logger = logging.getLogger("backup_pipelines")


RESTORE_LOG_NAME = "pitr_restore.log"
DRILL_HBA_NAME = "drill_pg_hba.conf"


_STOP_RE = re.compile(
    r"recovery stopping (?:before|after) (?:commit|abort) of transaction (\d+), time (.+)"
)
_LAST_TX_RE = re.compile(r"last completed transaction was at log time (.+)")
_TIMELINE_RE = re.compile(r"selected new timeline ID: (\d+)")


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
        as_server_user(argv, user), capture_output=True, text=True, check=False
    )
    result.started = True
    deadline = time.monotonic() + timeout_seconds
    timed_out = False
    while True:
        if (
            controldata_state(bin_dir, data_dir) == "in production"
            and not (data_dir / "recovery.signal").exists()
        ):
            result.promoted = True
            break
        if not postmaster_running(data_dir):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.3)
    _read_recovery_report(log_path, result)
    if result.promoted:
        return
    state = controldata_state(bin_dir, data_dir)
    stop_server(data_dir, bin_dir, user, "immediate")
    reason = server_failure_reason(
        server_log_lines(log_path, data_dir), started.stdout + started.stderr
    )
    if timed_out:
        what = (
            f"the restored server did not finish recovery within {timeout_seconds:.0f}s "
            f"(state: {state}) and was stopped"
        )
        hint = failure_hint(reason) or (
            "recovery was still replaying WAL: restore again with a longer "
            "pitr.drill_timeout_minutes, or check that wal-fetch can read the archive"
        )
    else:
        what = f"the restored server on port {result.port or 'from its configuration'} stopped"
        what += " before it was promoted: " + (reason or f"no reason in its log (state: {state})")
        hint = failure_hint(reason) or f"read the server log {log_path}"
    raise RestoreFailedError(what, hint=f"{hint}; {left_on_disk(data_dir, log_path)}")


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
    progress: ProgressReporter | None = None,
) -> PitrRestoreResult:
    """Restore ``target`` as it was at ``to`` into the new folder ``data_dir``. The extraction
    of the base backup reports to ``progress`` (default: lines in ``log``)."""
    log = log or logger
    progress = reporter_for(progress, log)
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
        captured: dict[str, bytes] = {}
        with progress.start(f"Extraction of {artifact.path.name}", meta.size_bytes) as meter:
            extract_base_backup(artifact, meta, data_dir, meter, server_config=captured)
        installed = install_server_config(
            data_dir, meta, captured, copy_name=f"{target.name} pitr copy"
        )
        for warning in installed.warnings:
            result.warnings.append(warning)
            log.warning(warning)
        for leftover in ("recovery.conf", "standby.signal", "postmaster.pid", "postmaster.opts"):
            with contextlib.suppress(FileNotFoundError):
                (data_dir / leftover).unlink()
        (data_dir / "recovery.signal").write_bytes(b"")
        # The copy's own files and sockets first; the recovery (and drill) settings win.
        lines = installed.settings | recovery_settings(
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
