"""What restores leave behind: the ``<db>_restoring_<time>`` databases and work folders of killed
restores and drills, and the databases earlier restores replaced (dropped after their grace
period); ``restore-cleanup`` and the restore lock."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from backup_pipelines.engine.backup.directory import remove_stale_work_folders
from backup_pipelines.engine.backup.files import ensure_target_dirs, target_lock
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import TargetBusyError
from backup_pipelines.engine.fsutil import ensure_private_dir, exclusive_lock
from backup_pipelines.engine.postgres import connect
from backup_pipelines.engine.processes import pid_alive
from backup_pipelines.engine.restore.database import (
    PREVIOUS_COPY_MARKER,
    RESTORING_MARKER,
    drop_database,
    maintenance_connection,
)
from backup_pipelines.engine.restore.errors import RestoreRefusedError

logger = logging.getLogger("backup_pipelines")


# restore-<pid>@<host>-<random>: whose folder it is, so a cleanup can tell a killed run's from a
# running one's (the work folder is shared by every target and by drills).
_WORK_TMP_RE = re.compile(r"^(?:restore|download)-(\d+)@(.+)-[A-Za-z0-9_]{8}$")


def work_tmp_dir(work_dir: Path, kind: str) -> Path:
    """A private temporary folder in ``work_dir`` named after this process and host."""
    ensure_private_dir(work_dir)
    prefix = f"{kind}-{os.getpid()}@{socket.gethostname()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))


def remove_abandoned_work_dirs(work_dir: Path, *, log: Any = None) -> list[Path]:
    """Remove temporary folders (decoded archives, downloads) of restores and drills that were
    killed: made on this host by a process that is gone. Returns what was removed."""
    log = log or logger
    removed: list[Path] = []
    if not work_dir.is_dir():
        return removed
    for entry in sorted(work_dir.iterdir()):
        match = _WORK_TMP_RE.match(entry.name)
        if match is None or not entry.is_dir() or match.group(2) != socket.gethostname():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning(f"Removed {entry}: temporary files of an interrupted run (pid {pid})")
        removed.append(entry)
    return removed


def work_dir_for(target: Target) -> Path:
    return target.backup_dir.parent / ".work"


def restore_lock(
    target: Target, *, hint: str = "wait for it to finish"
) -> contextlib.AbstractContextManager[None]:
    """Held by a restore of ``target`` from start to end; a dead holder releases it."""
    ensure_target_dirs(target)
    lock_path = target.backup_dir / ".restore.lock"
    return exclusive_lock(
        lock_path,
        lambda: RestoreRefusedError(
            f"another restore of target '{target.name}' is running ({lock_path})", hint=hint
        ),
    )


def _process_alive(host: object, pid: object) -> bool:
    if host != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return pid_alive(pid)


def drop_leftover_databases(
    admin: ConnectionInfo, target: Target, marker: str, *, log: Any = None
) -> list[str]:
    """Drop databases a killed restore or drill of ``target`` left behind.

    Only databases carrying our ``marker`` for this target, with no session connected and
    whose creating process is gone, are dropped: an in-progress run is never disturbed.
    """
    log = log or logger
    dropped = []
    with connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database'), "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) "
            "FROM pg_database d WHERE shobj_description(d.oid, 'pg_database') LIKE %s",
            (f'%"{marker}"%',),
        ).fetchall()
        for name, comment, sessions in rows:
            try:
                label = json.loads(comment)
            except ValueError:
                continue
            if label.get("marker") != marker or label.get("target") != target.name:
                continue
            if sessions or _process_alive(label.get("host"), label.get("pid")):
                continue
            drop_database(admin, name, force=False)
            log.warning(
                f"Dropped {name}, left behind by an interrupted run (pid {label.get('pid')} "
                f"on {label.get('host')}, started {label.get('created_at')})"
            )
            dropped.append(name)
    return dropped


def _restoring_name_of(name: str, database: str) -> bool:
    """True when ``name`` is what :func:`free_name` makes of ``database`` for a restore."""
    match = _RESTORING_SUFFIX.search(name)
    if match is None:
        return False
    tail = name[match.start() :]
    return name[: match.start()] == database.encode()[: 63 - len(tail.encode())].decode(
        "utf-8", "ignore"
    )


_RESTORING_SUFFIX = re.compile(r"_restoring_\d{8}_\d{6}(?:_\d{1,2})?$")


@dataclass
class LeftoverReport:
    """What a cleanup found of restores that were killed: dropped, or left alone and why."""

    dropped: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)


def _restoring_label(comment: str | None, target: Target) -> dict[str, Any] | None:
    """The label a restore of ``target`` put on its copy; None when absent or someone else's."""
    try:
        label = json.loads(comment) if comment else None
    except ValueError:
        return None
    if isinstance(label, dict) and label.get("marker") == RESTORING_MARKER:
        return label if label.get("target") == target.name else None
    return None


def drop_interrupted_restores(
    admin: ConnectionInfo, target: Target, database: str, *, log: Any = None
) -> LeftoverReport:
    """Drop the ``<database>_restoring_<time>`` databases killed restores of ``target`` left.

    The caller holds the target's restore lock, so no restore of it is running on this host.
    Dropped: databases labelled as ``target``'s restoring copy whose creating process is gone,
    and unlabelled ones with exactly the name a restore of ``database`` gives its copy (a
    restore killed between CREATE DATABASE and its label). Never the live ``database``, never a
    database with a session connected (e.g. a pg_restore the killed run left behind), never a
    database labelled by anyone else.
    """
    log = log or logger
    report = LeftoverReport(
        dropped=drop_leftover_databases(admin, target, RESTORING_MARKER, log=log)
    )
    with connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database'), "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) "
            "FROM pg_database d WHERE d.datname LIKE '%\\_restoring\\_%'"
        ).fetchall()
        for name, comment, sessions in rows:
            if name == database or not _restoring_name_of(name, database):
                continue
            label = _restoring_label(comment, target)
            if comment and label is None:
                continue  # labelled by someone else: not ours to judge
            if sessions:
                report.left_alone[name] = (
                    f"{sessions} session(s) still connected (a process of the interrupted "
                    "restore may still be writing it)"
                )
            elif label is not None:
                report.left_alone[name] = (
                    f"the process that created it (pid {label.get('pid')} on "
                    f"{label.get('host')}) is still running"
                )
            else:
                drop_database(admin, name, force=False)
                log.warning(f"Dropped {name}, left behind by a restore killed before labelling it")
                report.dropped.append(name)
    for name, reason in report.left_alone.items():
        log.warning(f"Left {name} alone: {reason}")
    return report


@dataclass
class RestoreCleanupReport:
    """What ``restore-cleanup`` did for one target."""

    interrupted: LeftoverReport
    expired: list[str]
    kept: list[tuple[str, datetime]]
    grace_hours: float | None
    work_dirs_removed: list[Path] = field(default_factory=list)


def restore_cleanup(
    target: Target, *, log: Any = None, now: datetime | None = None
) -> RestoreCleanupReport:
    """Drop what killed restores of ``target`` left (``<db>_restoring_<time>`` databases, and
    temporary files of killed restores and drills in the work folder) and the databases
    earlier restores replaced once past their grace period; report what is kept.

    Runs under the target's restore lock: while a restore of the target runs, it refuses
    (RestoreRefusedError) and drops nothing. The live database is never touched.
    """
    log = log or logger
    admin = maintenance_connection(target)
    live = ConnectionInfo.parse(target.dsn(), source=f"target '{target.name}'").dbname
    with restore_lock(
        target,
        hint="its databases are in use: run restore-cleanup again once it has finished "
        "(nothing was dropped)",
    ):
        interrupted = drop_interrupted_restores(admin, target, live, log=log)
        work_dirs = remove_abandoned_work_dirs(work_dir_for(target), log=log)
        work_dirs += _remove_stale_dump_folders(target, log)
        expired = drop_expired_previous_copies(target, log=log, now=now)
        with connect(admin, autocommit=True) as conn:
            kept = previous_copies(conn, target)
    return RestoreCleanupReport(
        interrupted, expired, kept, target.settings.restore.drop_previous_after_hours, work_dirs
    )


def _remove_stale_dump_folders(target: Target, log: Any) -> list[Path]:
    """pg_dump folders of killed directory-format backups; left alone while a backup runs."""
    try:
        with target_lock(target.backup_dir):
            return remove_stale_work_folders(target.backup_dir, log=log)
    except TargetBusyError:
        return []


def previous_copies(conn: psycopg.Connection, target: Target) -> list[tuple[str, datetime]]:
    """Databases a restore of ``target`` replaced and kept, with the time they were replaced."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE shobj_description(oid, 'pg_database') LIKE %s",
        (f'%"{PREVIOUS_COPY_MARKER}"%',),
    ).fetchall()
    copies = []
    for name, comment in rows:
        try:
            info = json.loads(comment)
            if info.get("marker") != PREVIOUS_COPY_MARKER or info.get("target") != target.name:
                continue
            copies.append((name, datetime.fromisoformat(info["replaced_at"])))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(copies, key=lambda item: item[1])


def drop_expired_previous_copies(
    target: Target, *, log: Any = None, now: datetime | None = None
) -> list[str]:
    """Drop the databases earlier restores replaced, once older than the grace period."""
    log = log or logger
    grace = target.settings.restore.drop_previous_after_hours
    if grace is None:
        return []
    admin = maintenance_connection(target)
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=grace)
    dropped = []
    with connect(admin, autocommit=True) as conn:
        for name, replaced_at in previous_copies(conn, target):
            if replaced_at <= cutoff:
                drop_database(admin, name)
                log.info(
                    f"Dropped {name}: replaced by a restore at {replaced_at.isoformat()}, "
                    f"older than the {grace:g} h grace period"
                )
                dropped.append(name)
    return dropped
