"""``wal-push``: PostgreSQL's ``archive_command``.

Success only once the file is durably stored everywhere: compressed, checksummed, fsynced and
renamed into place locally; uploaded and confirmed by S3's checksum. A file already archived
with *identical* content succeeds again (PostgreSQL re-archives after a crash); different
content under the same name is refused and never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from backup_pipelines.engine.compression import CHUNK_SIZE, compressor
from backup_pipelines.engine.config import DEFAULT_COMPRESSION_LEVEL
from backup_pipelines.engine.fsutil import open_private, partial_path
from backup_pipelines.engine.wal.archive import WalArchive, WalStore
from backup_pipelines.engine.wal.errors import WalConflictError, WalError
from backup_pipelines.engine.wal.names import object_stem, wal_kind
from backup_pipelines.engine.wal.records import WAL_EXTENSIONS, WalRecord

if TYPE_CHECKING:
    from backup_pipelines.engine.encryption import EncryptionPlan

logger = logging.getLogger("backup_pipelines")


@dataclass(frozen=True)
class PushOutcome:
    name: str
    stored: list[str]
    already_archived: list[str]
    original_size: int
    size: int


@dataclass(frozen=True)
class Spool:
    """The stored form of the source file (compressed, then encrypted when configured), with
    the checksums of both forms and the key that encrypted it."""

    path: Path
    compression: str
    sha256: str
    size: int
    original_sha256: str
    original_size: int
    source_mtime: datetime
    encryption: dict[str, Any] | None = None


class _Hashed:
    """Writes the stored bytes to ``out`` while hashing them (gpg's reader thread calls it)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.digest.update(data)
            self.size += len(data)
            self.out.write(data)


def encode_segment(
    source: Path, tmp: Path, codec: str, plan: EncryptionPlan | None = None
) -> Spool:
    """Write the stored form of ``source`` into the new file ``tmp`` (fsynced): compressed with
    ``codec``, then encrypted with ``plan`` (streamed through gpg), hashing both forms.

    Compression comes first (encrypted bytes do not compress), so ``gpg --decrypt | zstd -dc``
    restores the original. Nothing unencrypted is written when ``plan`` is given.
    """
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    original_digest = hashlib.sha256()
    original_size = 0
    compress = compressor(codec, DEFAULT_COMPRESSION_LEVEL[codec])
    stage = None
    try:
        with source.open("rb") as handle:
            mtime = datetime.fromtimestamp(os.fstat(handle.fileno()).st_mtime, UTC)
            with open_private(tmp) as out:
                stored = _Hashed(out)
                write = stored.write
                if plan is not None:
                    from backup_pipelines.engine.encryption import GpgEncryptStage

                    stage = GpgEncryptStage(plan, stored.write)
                    write = stage.write
                while chunk := handle.read(CHUNK_SIZE):
                    original_digest.update(chunk)
                    original_size += len(chunk)
                    write(compress.compress(chunk))
                write(compress.flush())
                if stage is not None:
                    stage.finish()
                    stage = None
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        if stage is not None:
            stage.abort()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return Spool(
        tmp,
        codec,
        stored.digest.hexdigest(),
        stored.size,
        original_digest.hexdigest(),
        original_size,
        mtime,
        dict(plan.meta) if plan is not None else None,
    )


def encryption_plan(archive: WalArchive) -> EncryptionPlan | None:
    """The loaded key or passphrase for ``archive``; raises EncryptionKeyError (so nothing is
    stored, in plaintext or otherwise) when one is configured but cannot be used."""
    if not archive.encrypted:
        return None
    from backup_pipelines.engine.encryption import prepare_encryption

    assert archive.encryption is not None
    return prepare_encryption(archive.encryption)


def wal_push(archive: WalArchive, source: Path, name: str | None = None) -> PushOutcome:
    """Archive one file PostgreSQL handed to ``archive_command``. Raises on anything short of
    "durably stored everywhere"; the caller maps that to a non-zero exit status."""
    name = name or source.name
    wal_kind(name)
    if not source.is_file():
        raise WalError(f"{source} does not exist or is not a file", hint="pass %p unchanged")
    for store in archive.stores:
        store.check_available()
    plan = encryption_plan(archive)
    codec = archive.settings.wal_compression
    stored_name = object_stem(name) + WAL_EXTENSIONS[codec]
    # A local folder gets the compressed copy right beside its final place: storing it there is
    # then a rename, not a second copy.
    local: WalStore | None = None
    tmp: Path | None = None
    for store in archive.stores:
        tmp = store.storage.spool_path(stored_name)
        if tmp is not None:
            local = store
            break
    scratch = None
    if tmp is None:
        scratch = Path(tempfile.mkdtemp(prefix="bp-wal-"))
        tmp = partial_path(scratch / (name + WAL_EXTENSIONS[codec]))
    spool = encode_segment(source, tmp, codec, plan)
    stored: list[str] = []
    already: list[str] = []
    try:
        record = WalRecord(
            name=name,
            stored_name=stored_name,
            compression=codec,
            sha256=spool.sha256,
            size=spool.size,
            original_sha256=spool.original_sha256,
            original_size=spool.original_size,
            archived_at=datetime.now(UTC),
            source_mtime=spool.source_mtime,
            encryption=spool.encryption,
        )
        # Remote places first, the local rename last: the local copy's record then never claims
        # more than every configured place holds.
        for store in [s for s in archive.stores if s is not local] + ([local] if local else []):
            existing = store.read_record(name)
            if existing is not None:
                if existing.original_sha256 != spool.original_sha256:
                    raise WalConflictError(
                        f"wal-push refused {name}: {store.description} already holds a DIFFERENT "
                        f"file under this name (archived sha256 {existing.original_sha256[:16]}…, "
                        f"{existing.original_size} bytes; this file sha256 "
                        f"{spool.original_sha256[:16]}…, {spool.original_size} bytes). "
                        "Nothing was overwritten.",
                        hint="two clusters probably archive into the same place (a restored copy or "
                        "a second server): give each cluster its own archive_dir/archive_s3",
                    )
                if store.intact(existing):
                    already.append(store.description)
                    continue
                logger.warning(
                    f"wal-push: the archived copy of {name} in {store.description} is damaged; "
                    "replacing it with the identical original"
                )
            store.store(record, spool.path, move=store is local)
            stored.append(store.description)
    finally:
        with contextlib.suppress(FileNotFoundError):
            spool.path.unlink()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return PushOutcome(name, stored, already, spool.original_size, spool.size)
