"""Backups held by a storage: open one by location, list the complete ones.

Use it like this::

    from backup_pipelines.engine.storage import open_backup

    artifact = open_backup("s3://bucket/prefix/prod/shop_20260101_020000.sql.gz")
    for chunk in artifact.stored_chunks():     # streamed from S3, 1 MiB at a time
        ...
    artifact = open_backup("/var/backups/prod/shop_20260101_020000.sql.gz")  # a local file

``open_backup`` returns a :class:`~backup_pipelines.engine.artifacts.BackupArtifact` for a local
path (``artifact.path`` is the real file) and a :class:`RemoteBackupArtifact` for ``s3://``
(``artifact.is_local`` is False and ``artifact.path`` is only the file *name*: code that needs a
real file, such as ``pg_restore -j`` on a bare custom archive, must decode into a temporary file
when ``not artifact.is_local``). Both stream with ``stored_chunks()`` and read the ``.sha256``
sidecar with ``recorded_sha256()``, so verify/restore code does not care where a backup lives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    load_artifact,
    parse_meta,
    parse_sha256_text,
)
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX
from backup_pipelines.engine.storage.base import BackupStorage, StorageError
from backup_pipelines.engine.storage.local import LocalStorage
from backup_pipelines.engine.storage.s3 import S3_SCHEME, S3Storage, parse_s3_url


@dataclass(frozen=True)
class RemoteBackupArtifact(BackupArtifact):
    """A backup held by a :class:`BackupStorage` (e.g. S3): streamed, never a local file.

    ``path`` is only ``Path(file name)`` (for messages); use ``location`` for the full URL.
    """

    storage: BackupStorage | None = None
    name: str = ""

    @property
    def is_local(self) -> bool:
        return False

    @property
    def damage(self) -> str | None:
        # The cheap local checks would cost S3 requests per backup; checksum checks cover copies.
        return None

    @property
    def location(self) -> str:
        assert self.storage is not None
        return self.storage.url(self.name)

    @property
    def globals_name(self) -> str | None:
        """The object holding the server's globals stored with this backup (None: older ones)."""
        entry = self.meta.globals
        if entry is None:
            return None
        folder = self.name.rpartition("/")[0]
        return f"{folder}/{entry.file_name}" if folder else entry.file_name

    @property
    def sidecar_names(self) -> list[str]:
        names = [self.name + SHA256_SUFFIX, self.name + META_SUFFIX]
        if self.globals_name is not None:
            names += [self.globals_name, self.globals_name + SHA256_SUFFIX]
        return names

    def globals_stored_chunks(self) -> Iterator[bytes]:
        assert self.storage is not None and self.globals_name is not None
        if self.storage.head(self.globals_name) is None:
            raise IntegrityError(
                f"globals file missing: {self.storage.url(self.globals_name)}",
                hint="the offsite copy of the backup set is incomplete: the roles cannot be "
                "recreated from it on a new server; use another backup",
            )
        yield from self.storage.iter_chunks(self.globals_name)

    def recorded_globals_sha256(self) -> str:
        assert self.storage is not None and self.globals_name is not None
        sidecar = self.globals_name + SHA256_SUFFIX
        try:
            text = self.storage.read_bytes(sidecar).decode("utf-8", "replace")
        except StorageError:
            raise IntegrityError(
                f"checksum file missing: {self.storage.url(sidecar)}",
                hint="the offsite copy is incomplete; do not trust it",
            ) from None
        return parse_sha256_text(text, self.storage.url(sidecar))

    def open_stored(self) -> BinaryIO:
        raise StorageError(
            f"{self.location} is remote: stream it with stored_chunks() instead of opening it"
        )

    def stored_chunks(self) -> Iterator[bytes]:
        assert self.storage is not None
        yield from self.storage.iter_chunks(self.name)

    def download(self, dest: Path, *, progress: Any = None) -> str:
        """Download the backup to ``dest`` (atomic, parallel ranges on S3), checked against its
        ``.sha256``; returns that digest."""
        assert self.storage is not None
        recorded = self.recorded_sha256()
        self.storage.get_file(self.name, dest, expected_sha256=recorded, progress=progress)
        return recorded

    def recorded_sha256(self) -> str:
        assert self.storage is not None
        try:
            text = self.storage.read_bytes(self.name + SHA256_SUFFIX).decode("utf-8", "replace")
        except StorageError:
            raise IntegrityError(
                f"checksum file missing: {self.location}{SHA256_SUFFIX}",
                hint="the offsite copy is incomplete; do not trust it",
            ) from None
        return parse_sha256_text(text, self.location + SHA256_SUFFIX)

    def record_check(self, name: str, passed: bool, message: str) -> BackupArtifact:
        """Record a verification outcome in the remote ``.meta`` (rewritten whole)."""
        assert self.storage is not None
        verification = dict(self.meta.verification or {})
        checks = dict(verification.get("checks") or {})
        checked_at = datetime.now(UTC).isoformat()
        checks[name] = {"passed": passed, "message": message, "checked_at": checked_at}
        verification.update(
            checks=checks, passed=all(c["passed"] for c in checks.values()), checked_at=checked_at
        )
        meta = self.meta.model_copy(update={"verification": verification})
        self.storage.put_bytes(
            self.name + META_SUFFIX, (meta.model_dump_json(indent=2) + "\n").encode()
        )
        return RemoteBackupArtifact(self.path, meta, self.storage, self.name)


def load_remote_artifact(storage: BackupStorage, name: str) -> RemoteBackupArtifact:
    """The backup ``name`` in ``storage`` (its ``.meta`` is read now; data is streamed later)."""
    for suffix in (META_SUFFIX, SHA256_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(PARTIAL_SUFFIX):
        raise IntegrityError(f"{storage.url(name)} is the leftover of an interrupted backup")
    if storage.head(name) is None:
        raise IntegrityError(
            f"backup not found: {storage.url(name)}",
            hint="list the offsite copies with `backup-pipelines prune <target> --dry-run`",
        )
    try:
        raw = storage.read_bytes(name + META_SUFFIX)
    except StorageError:
        raise IntegrityError(
            f"metadata file missing: {storage.url(name)}{META_SUFFIX}",
            hint="the offsite copy is incomplete or its sidecar was deleted; do not trust it",
        ) from None
    meta = parse_meta(raw, storage.url(name) + META_SUFFIX)
    return RemoteBackupArtifact(Path(name.rsplit("/", 1)[-1]), meta, storage, name)


def list_stored_backups(storage: BackupStorage, prefix: str = "") -> list[BackupArtifact]:
    """Complete backups in ``storage`` (data object + ``.meta``), newest first by recorded time."""
    # Only this folder, like list_artifacts locally: sub-folders (e.g. base/) hold other kinds.
    names = {info.name for info in storage.list(prefix) if "/" not in info.name[len(prefix) :]}
    artifacts: list[BackupArtifact] = []
    for name in names:
        if not name.endswith(META_SUFFIX):
            continue
        data = name[: -len(META_SUFFIX)]
        if data not in names or data.endswith(PARTIAL_SUFFIX):
            continue
        if isinstance(storage, LocalStorage):
            with contextlib.suppress(IntegrityError):
                artifacts.append(load_artifact(storage.root / data))
            continue
        with contextlib.suppress(IntegrityError):
            artifacts.append(load_remote_artifact(storage, data))
    artifacts.sort(key=lambda a: a.meta.started_at, reverse=True)
    return artifacts


def open_backup(location: str | os.PathLike[str], *, s3_client: Any = None) -> BackupArtifact:
    """Open a backup by location: a local path (of the file or its sidecar) or ``s3://bucket/key``."""
    text = os.fspath(location)
    if text.startswith(S3_SCHEME):
        bucket, key = parse_s3_url(text)
        return load_remote_artifact(S3Storage(bucket, client=s3_client), key)
    return load_artifact(text)
