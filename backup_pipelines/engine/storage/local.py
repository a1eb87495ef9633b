"""A local folder behind the storage interface: files 0600, folders 0700, every write atomic
(temporary name, fsync, rename, fsync the folder). The WAL archive's folder is one of these."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.fsutil import (
    FILE_MODE,
    SHARED_DIR_MODE,
    SHARED_FILE_MODE,
    atomic_writer,
    ensure_private_dir,
    folder_problem,
    fsync_dir,
    partial_path,
    share_file_with_group,
)
from backup_pipelines.engine.storage.base import (
    BackupStorage,
    ObjectInfo,
    ObjectNotFoundError,
    Progress,
    PutResult,
    StorageError,
    check_name,
    reported,
    require_digest,
)


class LocalStorage(BackupStorage):
    """Objects as files under ``root`` (an object's name is its relative path).

    ``what`` names the folder in messages ("WAL archive folder"). ``create_root=False`` is for
    a folder that must already exist (an archive volume): writing into a missing root fails
    with code ``NoSuchFolder`` instead of creating it, so an unmounted volume never fills the
    disk underneath. ``warn_shared=False`` skips the warning about folders other users can
    read (for writers that run very often; the root's sharing is reported once elsewhere).
    """

    def __init__(
        self,
        root: Path,
        *,
        what: str = "storage folder",
        create_root: bool = True,
        warn_shared: bool = True,
        group: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.what = what
        self.create_root = create_root
        self.warn_shared = warn_shared
        self.group = group
        self.file_mode = FILE_MODE if group is None else SHARED_FILE_MODE

    def _path(self, name: str) -> Path:
        path = self.root / check_name(name)
        # A symlinked folder inside the root must not lead outside it either.
        if self.root.resolve() not in path.resolve().parents:
            raise StorageError(f"object name {name!r} escapes {self.root}")
        return path

    def url(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def check_writable(self) -> None:
        if not self.create_root and not self.root.is_dir():
            raise StorageError(
                f"{self.what} {self.root} does not exist (or is not mounted)",
                hint=f"create it: install -d -m 0700 {self.root}",
                code="NoSuchFolder",
            )
        problem = folder_problem(self.root, self.what)
        if problem is not None:
            raise StorageError(
                problem,
                hint=f"give this OS user (uid {os.geteuid()}) write access to {self.root}",
                code="AccessDenied",
            )

    def _folder_for(self, dest: Path) -> None:
        if not self.create_root and not self.root.is_dir():
            self.check_writable()  # raises NoSuchFolder
        if self.group is None:
            ensure_private_dir(dest.parent, what=self.what, warn_shared=self.warn_shared)
        else:
            ensure_private_dir(dest.parent, what=self.what, mode=SHARED_DIR_MODE, group=self.group)

    def spool_path(self, name: str) -> Path:
        dest = self._path(name)
        self._folder_for(dest)
        return partial_path(dest)

    def put_file(
        self,
        source: Path,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
        move: bool = False,
    ) -> PutResult:
        dest = self._path(name)
        self._folder_for(dest)
        if move and _same_file_system(source, dest.parent):
            return self._move_in(source, name, dest, expected_sha256, progress)
        digest = hashlib.sha256()
        size = 0
        with (
            source.open("rb") as handle,
            atomic_writer(dest, mode=self.file_mode, group=self.group) as out,
        ):
            for chunk in reported(read_chunks(handle), progress):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            require_digest(source, digest.hexdigest(), expected_sha256)
        return PutResult(name, self.url(name), size, digest.hexdigest(), None, 1, size)

    def _move_in(
        self,
        source: Path,
        name: str,
        dest: Path,
        expected_sha256: str | None,
        progress: Progress | None,
    ) -> PutResult:
        # The caller wrote ``source`` itself: rename it into place instead of copying, after
        # checking its bytes and making sure they are on disk before the name appears.
        digest = hashlib.sha256()
        size = 0
        with source.open("rb") as handle:
            for chunk in read_chunks(handle):
                digest.update(chunk)
                size += len(chunk)
            require_digest(source, digest.hexdigest(), expected_sha256)
            if self.group is None:
                os.chmod(source, FILE_MODE)
            else:
                share_file_with_group(handle.fileno(), dest, self.file_mode, self.group)
            os.fsync(handle.fileno())
        os.replace(source, dest)
        fsync_dir(dest.parent)
        if progress is not None:
            progress(size)
        return PutResult(name, self.url(name), size, digest.hexdigest(), None, 1, size)

    def put_bytes(
        self,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> PutResult:
        dest = self._path(name)
        self._folder_for(dest)
        with atomic_writer(dest, mode=self.file_mode, group=self.group) as out:
            out.write(data)
        if progress is not None:
            progress(len(data))
        digest = hashlib.sha256(data).hexdigest()
        return PutResult(name, self.url(name), len(data), digest, None, 1, len(data))

    def iter_chunks(
        self, name: str, chunk_size: int = CHUNK_SIZE, *, progress: Progress | None = None
    ) -> Iterator[bytes]:
        path = self._path(name)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"{self.url(name)} does not exist") from None
        with handle:
            yield from reported(read_chunks(handle, chunk_size), progress)

    def head(self, name: str) -> ObjectInfo | None:
        try:
            info = self._path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return ObjectInfo(name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        found: list[ObjectInfo] = []
        try:
            _walk(self.root, "", prefix, found)
        except PermissionError as exc:
            raise StorageError(
                f"cannot read {self.what} {self.root} as uid {os.geteuid()}: {exc.strerror}",
                hint=f"give this OS user read access to {self.root}",
                code="AccessDenied",
            ) from None
        found.sort(key=lambda info: info.name)
        return found

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def tidy(self) -> None:
        """Remove empty sub-folders (never the root itself)."""
        if not self.root.is_dir():
            return
        for folder, _subfolders, _files in os.walk(self.root, topdown=False):
            if Path(folder) != self.root:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only succeeds when empty


def _same_file_system(source: Path, folder: Path) -> bool:
    try:
        return source.stat().st_dev == folder.stat().st_dev
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        return False


def _walk(folder: Path, relative: str, prefix: str, found: list[ObjectInfo]) -> None:
    """Append the files under ``folder`` whose names start with ``prefix`` to ``found``."""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = relative + entry.name
            if entry.is_dir(follow_symlinks=False):
                below = name + "/"
                # Only descend where names can still start with ``prefix``.
                if below.startswith(prefix) or prefix.startswith(below):
                    _walk(Path(entry.path), below, prefix, found)
                continue
            if not name.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                info = entry.stat()
                if stat.S_ISREG(info.st_mode):
                    modified = datetime.fromtimestamp(info.st_mtime, UTC)
                    found.append(ObjectInfo(name, info.st_size, modified))
