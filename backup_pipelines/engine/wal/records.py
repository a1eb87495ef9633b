"""The ``.meta`` record of one archived WAL file (written last: the commit point), and what
a listing sees."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.version import TOOL_VERSION
from backup_pipelines.engine.wal.names import WalKind, object_stem

RECORD_SUFFIX = ".meta"
WAL_EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


class WalRecord(BaseModel):
    """The ``.meta`` of one archived file: how it is stored and what it must decode to."""

    model_config = ConfigDict(extra="allow")

    name: str
    stored_name: str
    compression: str
    sha256: str
    size: int
    original_sha256: str
    original_size: int
    archived_at: datetime
    source_mtime: datetime | None = None
    tool_version: str = TOOL_VERSION
    # What the stored bytes are encrypted with (as in a backup's .meta: mode, key_id,
    # fingerprint(s); never a secret). None: compressed only.
    encryption: dict[str, Any] | None = None

    @property
    def encrypted(self) -> bool:
        return (self.encryption or {}).get("mode", "none") != "none"

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode("utf-8")


@dataclass(frozen=True)
class WalEntry:
    """One archived file as a listing sees it (no per-file reads)."""

    name: str
    kind: WalKind
    archived_at: datetime | None


def record_name(name: str) -> str:
    """The object holding the record of the WAL file ``name``."""
    return object_stem(name) + RECORD_SUFFIX


def record_from_bytes(data: bytes, where: str) -> WalRecord:
    try:
        return WalRecord.model_validate(json.loads(data))
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"WAL archive record {where} is unreadable: {exc}") from None
