"""An in-memory backend (as WAL-G has one): the storage contract without disk or network, so
tests of code written against :class:`BackupStorage` run in milliseconds. Nothing survives the
process: never configure it for real backups."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.storage.base import (
    BackupStorage,
    ObjectInfo,
    ObjectNotFoundError,
    Progress,
    PutResult,
    check_name,
    require_digest,
)

MEMORY_SCHEME = "memory://"


@dataclass(frozen=True)
class _Stored:
    data: bytes
    sha256: str
    modified: datetime
    metadata: dict[str, str]


class MemoryStorage(BackupStorage):
    """Objects in a dict; like S3 it keeps each object's metadata and whole-object SHA-256.

    Reads see a snapshot: an object replaced while it is being streamed keeps streaming the
    old bytes (S3 refuses that case with If-Match; nothing here can change under a reader).
    """

    def __init__(self, label: str = "store") -> None:
        self.label = label
        self._objects: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def url(self, name: str = "") -> str:
        return f"{MEMORY_SCHEME}{self.label}/{name}" if name else f"{MEMORY_SCHEME}{self.label}"

    def _store(
        self, name: str, data: bytes, digest: str, metadata: dict[str, str] | None
    ) -> PutResult:
        stored = _Stored(data, digest, datetime.now(UTC), dict(metadata or {}))
        with self._lock:
            self._objects[check_name(name)] = stored
        return PutResult(name, self.url(name), len(data), digest, None, 1, len(data))

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
        check_name(name)
        digest = hashlib.sha256()
        chunks = []
        with source.open("rb") as handle:
            for chunk in read_chunks(handle):
                digest.update(chunk)
                chunks.append(chunk)
                if progress is not None:
                    progress(len(chunk))
        require_digest(source, digest.hexdigest(), expected_sha256)
        return self._store(name, b"".join(chunks), digest.hexdigest(), metadata)

    def put_bytes(
        self,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> PutResult:
        result = self._store(name, bytes(data), hashlib.sha256(data).hexdigest(), metadata)
        if progress is not None:
            progress(len(data))
        return result

    def _get(self, name: str) -> _Stored:
        with self._lock:
            stored = self._objects.get(check_name(name))
        if stored is None:
            raise ObjectNotFoundError(f"{self.url(name)} does not exist")
        return stored

    def iter_chunks(
        self, name: str, chunk_size: int = CHUNK_SIZE, *, progress: Progress | None = None
    ) -> Iterator[bytes]:
        data = self._get(name).data
        for offset in range(0, len(data), chunk_size):
            chunk = data[offset : offset + chunk_size]
            if progress is not None:
                progress(len(chunk))
            yield chunk

    def head(self, name: str) -> ObjectInfo | None:
        try:
            stored = self._get(name)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(
            name,
            len(stored.data),
            stored.modified,
            sha256=stored.sha256,
            metadata=dict(stored.metadata),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        with self._lock:
            items = sorted(
                ((n, s) for n, s in self._objects.items() if n.startswith(prefix)),
                key=lambda item: item[0],
            )
        return [
            ObjectInfo(n, len(s.data), s.modified, sha256=s.sha256, metadata=dict(s.metadata))
            for n, s in items
        ]

    def delete(self, name: str) -> None:
        with self._lock:
            self._objects.pop(check_name(name), None)
