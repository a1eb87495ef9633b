"""Where backups and WAL are kept: one interface (``base.BackupStorage``), three backends.

    base.py          the interface: BackupStorage, ObjectInfo, PutResult, errors, Progress
    local.py         LocalStorage: a folder (0700 folders, 0600 files, atomic writes)
    s3.py            S3Storage: a bucket prefix (checksums confirmed by S3, resumable and
                     parallel ranged reads)
    s3_multipart.py  part sizing, S3's checksum forms, concurrent multipart uploads
    retry.py         the one retry policy for S3 (botocore's standard mode; nothing stacked)
    memory.py        MemoryStorage: a dict, for fast tests
    remote.py        backups held by a storage: open_backup, list_stored_backups

The names below are imported from their module on first use (``from
backup_pipelines.engine.storage import S3Storage`` works as usual): ``wal-push``/``wal-fetch``
run once per WAL file and load only what they use (a local archive never loads S3 code, nor the
backup metadata models of ``remote.py``; boto3 is imported when an S3 client is first needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from backup_pipelines.engine.storage.remote import (
        RemoteBackupArtifact,
        list_stored_backups,
        load_remote_artifact,
        open_backup,
    )
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

# name -> the module defining it
_EXPORTS = {
    "BackupStorage": "base",
    "ObjectInfo": "base",
    "ObjectNotFoundError": "base",
    "Progress": "base",
    "PutResult": "base",
    "StorageError": "base",
    "StorageUnreachableError": "base",
    "LocalStorage": "local",
    "MemoryStorage": "memory",
    "RemoteBackupArtifact": "remote",
    "list_stored_backups": "remote",
    "load_remote_artifact": "remote",
    "open_backup": "remote",
    "S3_MAX_ATTEMPTS": "retry",
    "S3_RETRIES": "retry",
    "default_s3_client": "retry",
    "s3_client_config": "retry",
    "S3_SCHEME": "s3",
    "S3Storage": "s3",
    "parse_s3_url": "s3",
    "MAX_PARTS": "s3_multipart",
    "MIN_PART_SIZE": "s3_multipart",
    "PART_SIZE_METADATA_KEY": "s3_multipart",
    "SHA256_METADATA_KEY": "s3_multipart",
    "checksums_match": "s3_multipart",
    "composite_checksum": "s3_multipart",
    "expected_s3_checksum": "s3_multipart",
    "part_size_for": "s3_multipart",
    "single_checksum": "s3_multipart",
}

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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
