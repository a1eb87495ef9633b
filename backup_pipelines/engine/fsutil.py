"""Durable, private file writes: temporary name, fsync, rename, fsync the folder.

Folders: :func:`ensure_private_dir` is the one way the tool makes or reuses a folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from backup_pipelines.engine.errors import BackupPipelinesError, FolderError

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600
DIR_MODE = 0o700
# Trees shared with a group on purpose (pitr.archive_group): the group reads, nobody else does;
# setgid keeps new entries in the group.
SHARED_FILE_MODE = 0o640
SHARED_DIR_MODE = 0o2750

logger = logging.getLogger("backup_pipelines")

# Errors that no retry fixes: the operator must change the path, its permissions or the mount.
_SETUP_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ELOOP,
}


def ensure_private_dir(
    path: Path,
    *,
    what: str = "folder",
    mode: int = DIR_MODE,
    parent_mode: int | None = None,
    warn_shared: bool = True,
    log: Any = None,
    group: int | None = None,
) -> Path:
    """Make sure ``path`` is a folder this process can write, and return it.

    Folders that do not exist yet are created with ``mode`` (0700 unless a caller needs another
    user to read them); missing parents get ``parent_mode`` (default: ``mode``; 0711 when
    another OS user must reach ``path`` through them). A folder that already exists is used
    as it is: its mode and owner were chosen by whoever made it (a shared 1777 or NFS folder
    must stay shared), so it is never chmodded; when other users may list or change its content
    a warning is logged (``warn_shared``). Raises :class:`FolderError` (exit status 2) naming
    ``what`` when the path is a file, cannot be created, or is not writable.

    ``group`` (a gid) is for folders shared on purpose with a group (``pitr.archive_group``):
    created folders get that group and ``mode`` (e.g. 02750), and an existing ``path`` owned by
    this user is brought back to them, so a shared tree stays shared whoever created what.
    """
    path = Path(path)
    created = _create_missing(path, what, mode, mode if parent_mode is None else parent_mode, group)
    if group is not None:
        if not created:
            _share_with_group(path, what, mode, group)
    elif not created and warn_shared:
        _warn_if_shared(path, what, log or logger)
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(
            f"{what} {path} is not writable by {_whoami()}"
            + (" (read-only file system)" if _read_only_mount(path) else ""),
            hint=f"give {_whoami()} write access to {path} (owner, group or ACL), remount it "
            "read-write, or point the setting at a writable folder",
        )
    return path


def folder_problem(path: Path, what: str = "folder") -> str | None:
    """Why :func:`ensure_private_dir` would fail for ``path``, without creating anything."""
    probe = Path(path)
    while True:
        try:
            info = probe.stat()
        except (FileNotFoundError, NotADirectoryError):  # a file may sit higher up
            if probe.parent == probe:
                return f"{what} {path}: no existing parent folder"
            probe = probe.parent
            continue
        except OSError as exc:
            return f"{what} {path} cannot be checked: {exc.strerror or exc}"
        break
    if not stat.S_ISDIR(info.st_mode):
        blocker = "" if probe == path else f" ({probe} is a file)"
        return f"{what} {path} is not a folder{blocker}"
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        read_only = " (read-only file system)" if _read_only_mount(probe) else ""
        return f"{what} {path} {verb} by {_whoami()}{read_only}"
    return None


def _create_missing(
    path: Path, what: str, mode: int, parent_mode: int, group: int | None = None
) -> bool:
    """Create ``path`` (``mode``) and its missing parents; True when ``path`` was created."""
    missing: list[Path] = []
    probe = path
    while True:
        try:
            info = probe.stat()
        except (FileNotFoundError, NotADirectoryError):  # a file may sit higher up
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
            continue
        except OSError as exc:
            raise _folder_error(path, what, exc) from None
        if not stat.S_ISDIR(info.st_mode):
            blocker = "" if probe == path else f" ({probe} is a file)"
            raise FolderError(
                f"{what} {path} is not a folder{blocker}",
                hint=f"move the file {probe} away or point the setting at a folder",
            )
        break
    for folder in reversed(missing):
        wanted = mode if folder == path else parent_mode
        try:
            folder.mkdir(mode=wanted)
        except FileExistsError:
            continue  # made by a concurrent run in the meantime
        except OSError as exc:
            raise _folder_error(path, what, exc) from None
        if group is not None:
            _share_with_group(folder, what, wanted, group)
            continue
        # mkdir's mode is filtered by the umask: set exactly what was asked for.
        folder.chmod(wanted)
    return bool(missing)


def _share_with_group(path: Path, what: str, mode: int, group: int) -> None:
    """Give ``path`` (owned by this user) the group ``group`` and the mode ``mode``.

    The group first: changing it may clear a setgid bit, and chmod then sets exactly ``mode``
    (which keeps setgid only when this user is in the group, hence the check).
    """
    try:
        info = path.stat()
        if info.st_uid != os.geteuid() and os.geteuid() != 0:
            return  # someone else's folder: they chose its group and mode
        if info.st_gid != group:
            os.chown(path, -1, group)
        if stat.S_IMODE(info.st_mode) != mode or info.st_gid != group:
            os.chmod(path, mode)
    except PermissionError:
        raise _group_error(path, what, group) from None
    except OSError as exc:
        raise _folder_error(path, what, exc) from None


def share_tree(root: Path, group: int, *, what: str = "folder") -> None:
    """Bring an existing tree to the shared layout: folders ``SHARED_DIR_MODE`` and files
    ``SHARED_FILE_MODE``, all with ``group`` (what was written before the group was set)."""
    _share_with_group(root, what, SHARED_DIR_MODE, group)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _share_with_group(Path(folder, name), what, SHARED_DIR_MODE, group)
        for name in files:
            path = Path(folder, name)
            if path.is_symlink():
                continue
            _share_with_group(path, "file", SHARED_FILE_MODE, group)


def share_file_with_group(fd: int, path: Path, mode: int, group: int) -> None:
    """Give the open file ``fd`` (about to be renamed to ``path``) its group and mode."""
    try:
        if os.fstat(fd).st_gid != group:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)
    except PermissionError:
        raise _group_error(path, "file", group) from None


def _group_error(path: Path, what: str, group: int) -> FolderError:
    name = _group_name(group)
    return FolderError(
        f"{what} {path} cannot be given the group {name}: {_whoami()} is not a member of it",
        hint=f"add the user to the group (usermod -aG {name} USER) and restart the process "
        "(PostgreSQL for archive_command), or unset pitr.archive_group",
    )


def _group_name(gid: int) -> str:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)


def _folder_error(path: Path, what: str, exc: OSError) -> BackupPipelinesError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    if exc.errno in _SETUP_ERRNOS:
        return FolderError(
            f"cannot create {what} {path}: {reason}{where}",
            hint=f"create it by hand with the right owner (mkdir -m 700 {path}; chown it to "
            f"{_whoami()}), or point the setting at a folder {_whoami()} can write",
        )
    return BackupPipelinesError(f"cannot create {what} {path}: {reason}{where}")


def _warn_if_shared(path: Path, what: str, log: Any) -> None:
    try:
        perms = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if perms & (stat.S_IROTH | stat.S_IWOTH):
        access = "read and write" if perms & stat.S_IWOTH else "list"
        log.warning(
            f"{what} {path} (mode {perms:04o}) lets other users {access} its content; it is "
            "left as it is (backup files are 0600 and new folders 0700): chmod o-rwx it if it "
            "is not meant to be shared"
        )


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _whoami() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable. As PostgreSQL does (fsync_fname), a filesystem that
    cannot open or fsync a directory (EACCES; EINVAL or EBADF on some network shares and FUSE
    filesystems) is accepted: there is nothing more to ask of it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def open_private(path: Path, *, readable: bool = False) -> BinaryIO:
    """Open a new 0600 file for writing; fails if it exists (no clobbering a concurrent run).
    ``readable``: its descriptor also allows ``os.pread`` (to check what was written)."""
    access = os.O_RDWR if readable else os.O_WRONLY
    fd = os.open(path, access | os.O_CREAT | os.O_EXCL, FILE_MODE)
    return os.fdopen(fd, "wb")


@contextlib.contextmanager
def atomic_writer(
    final: Path, *, mode: int = FILE_MODE, group: int | None = None, readable: bool = False
) -> Iterator[BinaryIO]:
    """Write to ``final.partial``; on success fsync and rename to ``final``; on error remove it.

    ``group`` (a gid) with ``mode`` (e.g. 0640) shares the file with a group; it gets both
    before its final name appears. ``readable``: see :func:`open_private`.
    """
    tmp = partial_path(final)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    handle = open_private(tmp, readable=readable)
    try:
        yield handle
        handle.flush()
        if group is not None:
            share_file_with_group(handle.fileno(), final, mode, group)
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        # Closing flushes what is buffered; on a full disk that fails again, and the temporary
        # file must still go: never leave an empty or half-written ``.partial`` behind.
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_atomic(final: Path, data: bytes) -> None:
    with atomic_writer(final) as handle:
        handle.write(data)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold an flock on ``lock_path`` or fail fast with ``busy()``; a dead holder releases it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy() from None
        yield
    finally:
        os.close(fd)
