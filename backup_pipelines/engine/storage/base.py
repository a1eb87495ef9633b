"""The one storage interface: a place holding objects by *name* (a relative, ``/``-separated key).

Backups (offsite copies) and the WAL archive both sit on it. Backends: :class:`LocalStorage` (a
folder), :class:`S3Storage` (a bucket prefix) and :class:`MemoryStorage` (a dict, for fast
tests). ``backup_pipelines_tests/engine/test_storage_contract.py`` runs the same contract
against all three, so code written against :class:`BackupStorage` behaves alike on each.

- ``put_file(path, name)`` streams a local file in; it returns only once the object is durably
  stored (local: fsync + rename; S3: the server confirmed our SHA-256). ``put_bytes`` for small
  objects. ``expected_sha256`` refuses a source that no longer matches its recorded digest.
- ``iter_chunks(name)`` streams an object out; ``read_bytes(name)`` for small ones;
  ``get_file(name, path)`` downloads one to a local file atomically, checking its SHA-256
  (S3 fetches byte ranges in parallel). A missing object raises :class:`ObjectNotFoundError`.
- ``head(name)`` (``None`` when absent), ``exists``, ``list(prefix)`` (sorted by name),
  ``delete(name)`` (absent is fine).
- ``progress``: the transfer methods accept ``progress=callable`` and call it with the number of
  bytes just moved (an increment, like boto3's ``Callback``), as data flows.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backup_pipelines.engine.compression import CHUNK_SIZE
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError
from backup_pipelines.engine.fsutil import atomic_writer

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (an increment)."""


class StorageError(BackupPipelinesError):
    """Backup storage refused or failed an operation (the message names the object)."""

    def __init__(self, message: str, hint: str | None = None, *, code: str = "") -> None:
        super().__init__(message, hint)
        # S3's error code (NoSuchKey, AccessDenied, ...) or the local equivalent
        # (NoSuchFolder, AccessDenied) when there is one.
        self.code = code


class StorageUnreachableError(StorageError):
    """The storage could not be reached after retries (network down, endpoint wrong, ...)."""


class ObjectNotFoundError(StorageError):
    """The named object does not exist."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, code="NoSuchKey")


@dataclass(frozen=True)
class ObjectInfo:
    """What a storage knows about one stored object without reading it."""

    name: str
    size: int
    modified: datetime | None = None
    sha256: str | None = None  # hex digest of the whole object when recorded at upload
    checksum_sha256: str | None = None  # S3's own checksum (``<b64>-<parts>`` when multipart)
    storage_class: str | None = None
    server_side_encryption: str | None = None
    kms_key_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # S3's ETag: pins one version of the object across ranged reads


@dataclass(frozen=True)
class PutResult:
    """One completed upload: what was stored and the checksums computed while streaming it."""

    name: str
    url: str
    size: int
    sha256: str  # hex digest of the whole file, computed from the bytes we sent
    checksum_sha256: str | None  # S3-form checksum we expect (and the server confirmed)
    parts: int
    part_size: int
    storage_class: str | None = None
    server_side_encryption: str | None = None
    kms_key_id: str | None = None


def check_name(name: str) -> str:
    """Refuse object names that are not plain relative keys (``a/b.sql.gz``): a name must never
    reach outside the storage's root, whichever backend holds it."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"object name {name!r} is not a plain relative name",
            hint="object names are relative paths without '..', '.' or empty parts",
        )
    return name


def require_digest(source: Path, actual: str, expected: str | None) -> None:
    """Raise IntegrityError when the bytes read from ``source`` no longer match its record."""
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{source} no longer matches its recorded SHA-256 ({actual[:16]}… instead of "
            f"{expected[:16]}…); it was not uploaded",
            hint="the local file was modified or damaged; verify it and use another backup",
        )


def require_download_digest(location: str, actual: str, expected: str | None) -> None:
    """Raise IntegrityError when downloaded bytes do not match the recorded SHA-256."""
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{location} does not match its recorded SHA-256 ({actual[:16]}… instead of "
            f"{expected[:16]}…); the download was discarded",
            hint="the stored copy is damaged or was replaced; use another backup",
        )


def reported(chunks: Iterable[bytes], progress: Progress | None) -> Iterator[bytes]:
    """Pass ``chunks`` through, telling ``progress`` the size of each one."""
    if progress is None:
        yield from chunks
        return
    for chunk in chunks:
        progress(len(chunk))
        yield chunk


class BackupStorage(ABC):
    """A place holding objects by relative name (see the module docstring for the contract)."""

    @abstractmethod
    def url(self, name: str = "") -> str:
        """A location string for ``name`` (``open_backup`` understands local paths and s3://)."""

    @abstractmethod
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
        """Store the file ``source`` as ``name``. ``move=True`` says the caller is done with
        ``source``: a store on the same file system may rename it into place instead of
        copying it (the caller removes it if it is still there afterwards)."""

    @abstractmethod
    def put_bytes(
        self,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> PutResult: ...

    @abstractmethod
    def iter_chunks(
        self, name: str, chunk_size: int = CHUNK_SIZE, *, progress: Progress | None = None
    ) -> Iterator[bytes]:
        """Stream the object; raises :class:`ObjectNotFoundError` when it does not exist."""

    @abstractmethod
    def head(self, name: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose name starts with ``prefix``, sorted by name."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; an absent object is not an error."""

    def read_bytes(self, name: str, *, progress: Progress | None = None) -> bytes:
        return b"".join(self.iter_chunks(name, progress=progress))

    def get_file(
        self,
        name: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Download ``name`` to ``dest`` atomically (a temporary name, fsync, rename) and return
        its hex SHA-256. When it differs from ``expected_sha256`` nothing is left at ``dest``
        and :class:`IntegrityError` is raised."""
        digest = hashlib.sha256()
        with atomic_writer(dest) as handle:
            for chunk in self.iter_chunks(name, progress=progress):
                handle.write(chunk)
                digest.update(chunk)
            require_download_digest(self.url(name), digest.hexdigest(), expected_sha256)
        return digest.hexdigest()

    def exists(self, name: str) -> bool:
        return self.head(name) is not None

    def check_writable(self) -> None:
        """Raise :class:`StorageError` when nothing can be stored right now (a local folder
        missing, unmounted or read-only). Object stores answer on the first request instead."""
        return None

    def spool_path(self, name: str) -> Path | None:
        """A temporary file path on the same file system as ``name``'s final place, for callers
        that write the object themselves and then ``put_file(..., move=True)`` it (no copy).
        ``None`` when the store is not a local folder."""
        return None

    def tidy(self) -> None:
        """Remove what deletions left behind (empty folders); nothing to do for object stores."""
        return None
