"""WAL file names and positions: what PostgreSQL hands us, where it lives in the archive,
segment numbers and LSNs."""

from __future__ import annotations

import re
from typing import Literal

from backup_pipelines.engine.wal.errors import WalError

DEFAULT_SEGMENT_SIZE = 16 << 20

_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
_BACKUP_LABEL = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")

WalKind = Literal["segment", "partial", "backup", "history"]


def wal_kind(name: str) -> WalKind:
    """What PostgreSQL asks us to archive, judged by its name; anything else is refused."""
    if _SEGMENT.match(name):
        return "segment"
    if _PARTIAL.match(name):
        return "partial"
    if _BACKUP_LABEL.match(name):
        return "backup"
    if _HISTORY.match(name):
        return "history"
    raise WalError(
        f"{name!r} is not a WAL file name (segment, .partial, .backup or .history)",
        hint="archive_command must pass %p (or %f) unchanged: wal-push %p",
    )


def object_stem(name: str) -> str:
    """Where a WAL file lives in the archive, without extension."""
    if wal_kind(name) == "history":
        return f"history/{name}"
    return f"{name[:16]}/{name}"


def segments_per_log(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_number(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The position of a segment (or .partial/.backup file) in the WAL, ignoring the timeline."""
    return int(name[8:16], 16) * segments_per_log(segment_size) + int(name[16:24], 16)


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_log = segments_per_log(segment_size)
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def parse_lsn(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_of_lsn(lsn: str | int, timeline: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    position = parse_lsn(lsn) if isinstance(lsn, str) else lsn
    return segment_name(timeline, position // segment_size, segment_size)
