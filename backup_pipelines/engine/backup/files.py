"""What every backup writes with: the target's folder and its lock, the hashing sink that
counts and hashes the stored bytes, and the undoing of a failed backup (a full disk named)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from backup_pipelines.engine.config import Target
from backup_pipelines.engine.errors import BackupFailedError, BackupPipelinesError, TargetBusyError
from backup_pipelines.engine.fsutil import ensure_private_dir, exclusive_lock
from backup_pipelines.engine.processes import stop


class HashingSink:
    """The last stage: counts and hashes exactly the bytes that are stored."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.digest.update(data)
            self.handle.write(data)
            self.size += len(data)


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
