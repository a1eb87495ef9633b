"""The point-in-time recovery drill: restore to a fresh moment on a scratch port and folder, prove
the copy stopped exactly at that moment, clean up."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from backup_pipelines.engine.backup.base_reader import chown_tree
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupPipelinesError, RestoreFailedError
from backup_pipelines.engine.fsutil import ensure_private_dir
from backup_pipelines.engine.pitr.recover import DRILL_HBA_NAME, pitr_restore
from backup_pipelines.engine.pitr.server import check_port_free, server_bin_dir, stop_server
from backup_pipelines.engine.pitr.window import usable_base_backups
from backup_pipelines.engine.postgres import connect, server_major
from backup_pipelines.engine.progress import ProgressReporter
from backup_pipelines.engine.wal import WalArchive, pitr_settings, wal_archive_for

logger = logging.getLogger("backup_pipelines")


# md5 accepts both md5 and SCRAM password hashes; only 127.0.0.1 and the 0700 socket folder.
DRILL_HBA = "local all all peer\nhost all all 127.0.0.1/32 md5\n"


@dataclass
class PitrDrillResult:
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


def pitr_drill(
    config: ProjectConfig,
    target: Target,
    *,
    log: Any = None,
    progress: ProgressReporter | None = None,
) -> PitrDrillResult:
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
    result = PitrDrillResult(target.name, False, "not run")
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
            progress=progress,
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
