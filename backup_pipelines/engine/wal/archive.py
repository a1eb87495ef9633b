"""The WAL archive: every place a target's WAL is kept, each a storage from ``engine/storage``
(the same folder store and S3 store as backups) seen through the archive's rules.

Layout (the same object names in a local folder and under an S3 prefix)::

    <archive>/<timeline+log>/<segment><ext>          e.g. 0000000100000000/000000010000000000000003.zst
    <archive>/<timeline+log>/<segment>.meta          JSON record; written last = the commit point
    <archive>/history/<timeline>.history<ext> (+ .meta)

A data object without its ``.meta`` is the leftover of an interrupted push, never an archived file.

With the target's ``encryption`` configured, data objects are compressed then OpenPGP-encrypted
(``gpg --decrypt FILE | zstd -dc`` gives the segment back); ``.meta`` says which key.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_pipelines.engine.config import (
    EncryptionSettings,
    PitrSettings,
    ProjectConfig,
    Target,
)
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError, IntegrityError
from backup_pipelines.engine.storage import (
    BackupStorage,
    LocalStorage,
    ObjectNotFoundError,
    StorageError,
)
from backup_pipelines.engine.wal.errors import WalError
from backup_pipelines.engine.wal.names import wal_kind
from backup_pipelines.engine.wal.records import (
    RECORD_SUFFIX,
    WalEntry,
    WalRecord,
    record_from_bytes,
    record_name,
)

# Hints for a local archive folder that cannot be used, by StorageError code.
_FOLDER_HINTS = {
    "NoSuchFolder": "create it for the server's OS user: `backup-pipelines wal-setup <target>` "
    "or `install -d -o postgres -m 0700 {root}`",
    "AccessDenied": "chown it to the server's OS user: chown -R postgres: {root}",
}
_READ_HINT = (
    "run monitoring and restores as root or as the server's OS user, or share the archive "
    "with this user's group: set pitr.archive_group, add both users to that group, then run "
    "`backup-pipelines wal-setup <target>` as root"
)


@dataclass
class WalStore:
    """One place holding archived WAL: a storage plus the archive's rules (records, layout)."""

    storage: BackupStorage

    @property
    def description(self) -> str:
        return self.storage.url()

    def check_available(self) -> None:
        """Raise WalError when the archive cannot be written right now (never creates it)."""
        try:
            self.storage.check_writable()
        except StorageError as exc:
            template = _FOLDER_HINTS.get(exc.code)
            hint = template.format(root=self.storage.url()) if template else exc.hint
            raise WalError(exc.message, hint=hint) from None

    def read_record(self, name: str) -> WalRecord | None:
        """The record of ``name`` (None when it is not archived here)."""
        try:
            data = self.storage.read_bytes(record_name(name))
        except ObjectNotFoundError:
            return None
        return record_from_bytes(data, self.storage.url(record_name(name)))

    def spool_path(self, record: WalRecord) -> Path | None:
        """Where wal-push may compress into, so that storing here is a rename (local folder)."""
        return self.storage.spool_path(record.stored_name)

    def store(self, record: WalRecord, data: Path, *, move: bool = False) -> None:
        """Store the compressed file ``data``, then its record (the commit point). Returns only
        once both are durable: fsync + rename locally, checksum confirmed by S3."""
        key = (record.encryption or {}).get("key_id")
        self.storage.put_file(
            data,
            record.stored_name,
            expected_sha256=record.sha256,
            move=move,
            # S3 object metadata says which key, for whoever looks at the bucket alone.
            metadata={"encryption-key-id": key} if key else None,
        )
        info = self.storage.head(record.stored_name)
        if info is None or info.size != record.size:
            raise WalError(
                f"{self.storage.url(record.stored_name)} is not there with {record.size} bytes "
                "after storing it; not reporting it as archived"
            )
        self.storage.put_bytes(record_name(record.name), record.to_bytes())

    def chunks(self, record: WalRecord) -> Iterator[bytes]:
        try:
            yield from self.storage.iter_chunks(record.stored_name)
        except ObjectNotFoundError:
            raise IntegrityError(
                f"{self.storage.url(record.stored_name)} is missing although its record exists"
            ) from None

    def intact(self, record: WalRecord) -> bool:
        """Whether the stored bytes still match the record's checksum (read in full)."""
        digest = hashlib.sha256()
        try:
            for chunk in self.chunks(record):
                digest.update(chunk)
        except BackupPipelinesError:
            return False
        return digest.hexdigest() == record.sha256

    def entries(self) -> list[WalEntry]:
        """Every archived file (one listing, no per-file reads)."""
        try:
            infos = self.storage.list()
        except StorageError as exc:
            if exc.code != "AccessDenied":
                raise
            raise WalError(exc.message, hint=_READ_HINT) from None
        found = []
        for info in infos:
            if not info.name.endswith(RECORD_SUFFIX):
                continue
            name = info.name.rsplit("/", 1)[-1][: -len(RECORD_SUFFIX)]
            with contextlib.suppress(WalError):
                kind = wal_kind(name)
                # Only records where read_record would find them count as archived.
                if record_name(name) == info.name:
                    found.append(WalEntry(name, kind, info.modified))
        return found

    def delete(self, name: str) -> None:
        record = self.read_record(name)
        # Record first: a file without a record is a leftover, never a half-deleted entry.
        self.storage.delete(record_name(name))
        if record is not None:
            self.storage.delete(record.stored_name)

    def tidy(self) -> None:
        self.storage.tidy()


@dataclass
class WalArchive:
    """Every place a target's WAL is archived to, in order (local first, then S3)."""

    target: str
    settings: PitrSettings
    stores: list[WalStore]
    # The target's OpenPGP settings: what wal-push encrypts with and wal-fetch decrypts with.
    encryption: EncryptionSettings | None = None

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None and self.encryption.mode != "none"

    @property
    def primary(self) -> WalStore:
        return self.stores[0]

    def describe(self) -> str:
        return " + ".join(s.description for s in self.stores)


def local_wal_storage(root: Path, *, group: int | None = None) -> LocalStorage:
    """The archive folder written by ``archive_command`` (so owned by the server's OS user).

    It is never created here: an unmounted archive volume must fail loudly instead of filling
    the server's own disk. Its sharing is reported once, by ``wal-setup``, not per segment.
    ``group`` (``pitr.archive_group``): files 0640 and folders 2750 with that group.
    """
    return LocalStorage(
        root, what="WAL archive folder", create_root=False, warn_shared=False, group=group
    )


def s3_wal_storage(url: str, *, client: Any = None) -> BackupStorage:
    """An S3 prefix; an upload counts only once S3 confirmed its SHA-256 checksum."""
    from backup_pipelines.engine.storage import S3Storage, parse_s3_url

    bucket, prefix = parse_s3_url(url)
    # Server-side encryption at rest for WAL (it holds every row change in clear).
    return S3Storage(
        bucket, prefix, client=client, server_side_encryption="AES256", backoff_seconds=0.3
    )


def wal_archive_for(target: Target, *, s3_client: Any = None) -> WalArchive:
    settings = pitr_settings(target)
    stores: list[WalStore] = []
    if settings.archive_dir is not None:
        stores.append(WalStore(local_wal_storage(settings.archive_dir, group=settings.archive_gid)))
    if settings.archive_s3 is not None:
        stores.append(WalStore(s3_wal_storage(settings.archive_s3, client=s3_client)))
    return WalArchive(target.name, settings, stores, target.settings.encryption)


def pitr_settings(target: Target) -> PitrSettings:
    if target.settings.pitr is None:
        raise ConfigError(
            f"target '{target.name}' has no 'pitr:' block: point-in-time recovery is not enabled",
            hint="add `pitr: {archive_dir: /var/lib/backup-pipelines/wal/<target>}` to the target",
        )
    return target.settings.pitr


def resolve_pitr_target(config: ProjectConfig, name: str | None) -> Target:
    """The named target, or the only PITR-enabled one when no name is given."""
    if name:
        target = config.target(name)
        pitr_settings(target)
        return target
    enabled = [t for t in config.all_targets() if t.settings.pitr is not None]
    if len(enabled) == 1:
        return enabled[0]
    names = ", ".join(t.name for t in enabled) or "(none)"
    raise ConfigError(
        "which target? pass --target NAME",
        hint=f"targets with point-in-time recovery: {names}",
    )
