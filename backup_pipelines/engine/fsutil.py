"""Durable, private file writes: temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600
DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700; tighten it if it already exists."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if (path.stat().st_mode & 0o777) != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def open_private(path: Path) -> BinaryIO:
    """Open a new 0600 file for writing; fails if it exists (no clobbering a concurrent run)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    return os.fdopen(fd, "wb")


@contextlib.contextmanager
def atomic_writer(final: Path) -> Iterator[BinaryIO]:
    """Write to ``final.partial``; on success fsync and rename to ``final``; on error remove it."""
    tmp = partial_path(final)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    handle = open_private(tmp)
    try:
        yield handle
        handle.flush()
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
