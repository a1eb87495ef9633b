"""``wal-fetch``: PostgreSQL's ``restore_command``.

Both checksums (of the stored and of the decompressed bytes) are verified while decrypting
(segments archived encrypted, with the key their record names: the target's current key or one
of its previous ones) and decompressing, before the file is renamed into place. "Not in the
archive" is reported distinctly (:class:`WalNotFoundError`, exit status 1): that is how recovery
learns it reached the end of the archive. A damaged copy is skipped for the next place that
holds the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from backup_pipelines.engine.compression import decompress_chunks
from backup_pipelines.engine.errors import EncryptionError, IntegrityError
from backup_pipelines.engine.fsutil import FILE_MODE
from backup_pipelines.engine.wal.archive import WalArchive, WalStore
from backup_pipelines.engine.wal.errors import WalNotFoundError
from backup_pipelines.engine.wal.names import wal_kind
from backup_pipelines.engine.wal.records import WalRecord

logger = logging.getLogger("backup_pipelines")


@dataclass(frozen=True)
class FetchOutcome:
    name: str
    source: str
    size: int


def wal_fetch(archive: WalArchive, name: str, destination: Path) -> FetchOutcome:
    """Restore one archived file to ``destination`` after verifying it. Raises WalNotFoundError
    when no place has it, IntegrityError when every copy found is damaged."""
    wal_kind(name)
    problems: list[str] = []
    found_any = False
    for store in archive.stores:
        try:
            record = store.read_record(name)
        except IntegrityError as exc:
            problems.append(exc.message)
            found_any = True
            continue
        if record is None:
            continue
        found_any = True
        try:
            size = decode_segment(archive, store, record, destination)
        except IntegrityError as exc:
            problems.append(exc.message)
            logger.error(f"wal-fetch: {exc.message}")
            continue
        return FetchOutcome(name, store.description, size)
    if not found_any:
        raise WalNotFoundError(f"{name} is not in the WAL archive ({archive.describe()})")
    raise IntegrityError(
        f"wal-fetch refused {name}: every archived copy is damaged: " + "; ".join(problems),
        hint="recovery cannot continue past this file; restore to an earlier time or use "
        "another copy of the archive",
    )


def decode_segment(
    archive: WalArchive, store: WalStore, record: WalRecord, destination: Path
) -> int:
    """Write the original bytes of ``record`` (from ``store``) to ``destination`` atomically:
    decrypt (if encrypted), decompress, verify both checksums, then rename into place. Raises
    IntegrityError for a damaged copy, EncryptionKeyError when no configured key opens it."""
    tmp = destination.with_name(destination.name + ".bp-fetch")
    stored_digest, original_digest = hashlib.sha256(), hashlib.sha256()
    original_size = 0
    where = f"{store.description}: {record.name}"

    def stored_chunks() -> Iterator[bytes]:
        for chunk in store.chunks(record):
            stored_digest.update(chunk)
            yield chunk

    chunks: Iterable[bytes] = stored_chunks()
    if record.encrypted:
        from backup_pipelines.engine.encryption import decrypt_chunks

        chunks = decrypt_chunks(
            record.encryption or {},
            chunks,
            name=where,
            target=archive.target,
            candidates=[archive.encryption] if archive.encryption is not None else None,
        )
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in decompress_chunks(record.compression, chunks, name=where):
                    original_digest.update(chunk)
                    original_size += len(chunk)
                    out.write(chunk)
            except EncryptionError:
                # gpg cannot tell a wrong key from damaged bytes in every case: the recorded
                # checksum can. A damaged copy is an IntegrityError (the next place may hold a
                # good one); an intact one really needs another key.
                if not store.intact(record):
                    raise IntegrityError(
                        f"{store.description}: {record.stored_name} does not match its "
                        "recorded SHA-256 (damaged)"
                    ) from None
                raise
        if stored_digest.hexdigest() != record.sha256:
            raise IntegrityError(
                f"{store.description}: {record.stored_name} does not match its recorded "
                f"SHA-256 (got {stored_digest.hexdigest()[:16]}…, recorded {record.sha256[:16]}…)"
            )
        if original_digest.hexdigest() != record.original_sha256 or (
            original_size != record.original_size
        ):
            raise IntegrityError(
                f"{store.description}: {record.name} decompresses to different content than "
                "was archived"
            )
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return original_size
