"""What every backup writes with: the target's folder and its lock, the hashing sink that
counts and hashes the stored bytes, and the undoing of a failed backup (a full disk named)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import BackupFailedError, BackupPipelinesError, TargetBusyError
from backup_pipelines.engine.fsutil import ensure_private_dir, exclusive_lock
from backup_pipelines.engine.processes import stop

# Ask the disk for the bytes written so far each time this many more have been written.
WRITEBACK_EVERY = 32 << 20


class HashingSink:
    """The last stage: counts and hashes exactly the bytes that are stored, and gets them onto
    the disk while the backup is still running.

    Linux holds written data in memory until 10% of RAM is dirty or it is 30 s old, so without
    help the fsync that commits a backup would write the whole file at the end (0.9 s for
    456 MiB here, after the dump). A background ``fdatasync`` every ``WRITEBACK_EVERY`` bytes
    writes it beside the dump instead; :meth:`commit` then only waits for the last part. An
    error the background sync meets is kept and raised by :meth:`commit`: the kernel reports a
    write error to one fsync only, and it must fail the backup, not vanish in a thread.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0
        self._unsynced = 0
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, data: bytes) -> None:
        if data:
            self.digest.update(data)
            self.handle.write(data)
            self.size += len(data)
            self._unsynced += len(data)
            if self._unsynced >= WRITEBACK_EVERY:
                self._start_writeback()

    def _start_writeback(self) -> None:
        if self._syncer is not None and self._syncer.is_alive():
            return  # the disk is still busy with the last request; the next write asks again
        self._unsynced = 0
        self._syncer = threading.Thread(
            target=self._writeback, args=(self.handle.fileno(),), name="writeback", daemon=True
        )
        self._syncer.start()

    def _writeback(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._sync_error = self._sync_error or exc

    def commit(self) -> None:
        """Flush and fsync everything written; raises the first error any sync met."""
        self.handle.flush()
        if self._syncer is not None:
            self._syncer.join()
        os.fsync(self.handle.fileno())
        if self._sync_error is not None:
            raise self._sync_error


def ensure_target_dirs(target: Target, *, log: Any = None) -> Path:
    """``backup_root`` and the target's folder in it, ready to write (new folders are 0700)."""
    ensure_private_dir(target.backup_dir.parent, what="backup_root", log=log)
    return ensure_private_dir(
        target.backup_dir, what=f"backup folder of target '{target.name}'", log=log
    )


def target_lock(backup_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One backup per target directory at a time (a second one fails fast, it does not queue)."""
    lock_path = backup_dir / ".lock"
    return exclusive_lock(
        lock_path,
        lambda: TargetBusyError(
            f"another backup of this target is running (lock {lock_path}); this one was "
            "refused and changed nothing",
            hint="wait for it to finish; a lock of a dead process is released automatically",
        ),
    )


def _mount_of(directory: Path) -> tuple[str, str]:
    """The mount point holding ``directory`` and its filesystem type (from /proc/mounts)."""
    resolved = directory.resolve()
    best, fstype = "/", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1].replace("\\040", " ")
            if resolved.is_relative_to(mount) and len(mount) >= len(best):
                best, fstype = mount, fields[2]
    return best, fstype


def describe_free_space(directory: Path) -> str:
    """``filesystem /srv/backups (ext4): 1.2 MiB free of 50.0 GiB``: the disk that filled up."""
    from backup_pipelines.engine.listing import human_size

    usage = shutil.disk_usage(directory)
    mount, fstype = _mount_of(directory)
    return (
        f"filesystem {mount} ({fstype}): {human_size(usage.free)} free of {human_size(usage.total)}"
    )


def discard_failed_backup(
    exc: BaseException,
    *,
    what: str,
    folder: Path,
    proc: subprocess.Popen[bytes] | None,
    aborts: Sequence[Callable[[], object]],
    leftovers: Sequence[Path],
) -> BaseException:
    """Undo a failed backup: stop the producer, abort extra stages (gpg), remove every file
    written. Returns the error to raise, with a full disk turned into an actionable one."""
    if proc is not None:
        stop(proc)
    for abort in aborts:
        with contextlib.suppress(Exception):
            abort()
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackupFailedError(
            f"disk full while writing {what} to {folder} ({describe_free_space(folder)} after "
            "removing the unfinished files); nothing of this backup was kept",
            hint="free space on that filesystem, move backup_root to a larger volume, or prune "
            "old backups (`backup-pipelines prune <target>`)",
        )
    if isinstance(exc, OSError) and not isinstance(exc, BackupPipelinesError):
        return BackupFailedError(f"writing {what} failed: {exc}")
    return exc
