"""Where backups and WAL are kept: one interface (``base.BackupStorage``), three backends.

    base.py          the interface: BackupStorage, ObjectInfo, PutResult, errors, Progress
    local.py         LocalStorage: a folder (0700 folders, 0600 files, atomic writes)
    s3.py            S3Storage: a bucket prefix (checksums confirmed by S3, resumable reads)
    s3_multipart.py  part sizing and S3's checksum forms
    retry.py         the one retry policy for S3 (botocore's standard mode; nothing stacked)
    memory.py        MemoryStorage: a dict, for fast tests
    remote.py        backups held by a storage: open_backup, list_stored_backups

boto3 is imported only when an S3 client is first needed, and ``remote.py`` (which loads the
backup metadata models) only when one of its names is used: ``wal-push``/``wal-fetch`` run once
per WAL file and must stay cheap to start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.storage.base import (
    BackupStorage,
    ObjectInfo,
    ObjectNotFoundError,
    Progress,
    PutResult,
    StorageError,
    StorageUnreachableError,
)
from backup_pipelines.engine.storage.local import LocalStorage
from backup_pipelines.engine.storage.memory import MemoryStorage
from backup_pipelines.engine.storage.retry import (
    S3_MAX_ATTEMPTS,
    S3_RETRIES,
    default_s3_client,
    s3_client_config,
)
from backup_pipelines.engine.storage.s3 import S3_SCHEME, S3Storage, parse_s3_url
from backup_pipelines.engine.storage.s3_multipart import (
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_SIZE_METADATA_KEY,
    SHA256_METADATA_KEY,
    checksums_match,
    composite_checksum,
    expected_s3_checksum,
    part_size_for,
    single_checksum,
)

if TYPE_CHECKING:
    from backup_pipelines.engine.storage.remote import (
        RemoteBackupArtifact,
        list_stored_backups,
        load_remote_artifact,
        open_backup,
    )

_REMOTE = {"RemoteBackupArtifact", "list_stored_backups", "load_remote_artifact", "open_backup"}

__all__ = [
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "PART_SIZE_METADATA_KEY",
    "S3_MAX_ATTEMPTS",
    "S3_RETRIES",
    "S3_SCHEME",
    "SHA256_METADATA_KEY",
    "BackupStorage",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectNotFoundError",
    "Progress",
    "PutResult",
    "RemoteBackupArtifact",
    "S3Storage",
    "StorageError",
    "StorageUnreachableError",
    "checksums_match",
    "composite_checksum",
    "default_s3_client",
    "expected_s3_checksum",
    "list_stored_backups",
    "load_remote_artifact",
    "open_backup",
    "parse_s3_url",
    "part_size_for",
    "s3_client_config",
    "single_checksum",
]


def __getattr__(name: str) -> Any:
    if name in _REMOTE:
        from backup_pipelines.engine.storage import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
