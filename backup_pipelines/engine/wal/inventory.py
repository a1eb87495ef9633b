"""What is in the archive: listing, gaps, the newest segment, pruning."""

from __future__ import annotations

import json
from dataclasses import dataclass

from backup_pipelines.engine.wal.archive import WalArchive
from backup_pipelines.engine.wal.names import (
    DEFAULT_SEGMENT_SIZE,
    segment_name,
    segment_number,
    timeline_of,
)
from backup_pipelines.engine.wal.records import WalEntry


def list_wal(archive: WalArchive) -> list[WalEntry]:
    """Everything in the primary place, sorted by name (history files last)."""
    return sorted(archive.primary.entries(), key=lambda e: (e.kind == "history", e.name))


@dataclass(frozen=True)
class WalGap:
    first_missing: str
    last_missing: str
    count: int


def find_gaps(
    entries: list[WalEntry], start_segno: int | None, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> list[WalGap]:
    """Segment numbers missing (on every timeline) between ``start_segno`` (default: the oldest
    archived) and the newest archived segment."""
    segments = [e for e in entries if e.kind == "segment"]
    if not segments:
        return []
    present: dict[int, int] = {}
    for entry in segments:
        present.setdefault(segment_number(entry.name, segment_size), timeline_of(entry.name))
    newest = max(present)
    first = min(present) if start_segno is None else start_segno
    gaps: list[WalGap] = []
    run_start: int | None = None
    timeline = timeline_of(min(segments, key=lambda e: e.name).name)
    for segno in range(first, newest + 1):
        if segno in present:
            timeline = present[segno]
            if run_start is not None:
                gaps.append(
                    WalGap(
                        segment_name(timeline, run_start, segment_size),
                        segment_name(timeline, segno - 1, segment_size),
                        segno - run_start,
                    )
                )
                run_start = None
        elif run_start is None:
            run_start = segno
    return gaps


def newest_segment(entries: list[WalEntry]) -> WalEntry | None:
    segments = [e for e in entries if e.kind in ("segment", "partial")]
    if not segments:
        return None
    return max(segments, key=lambda e: (segment_number(e.name[:24]), e.name))


def prune_wal(
    archive: WalArchive, keep_from_segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> list[str]:
    """Delete segments (and .partial/.backup files) strictly before ``keep_from_segno``, the first
    segment the oldest retained base backup needs. History files are tiny and always kept."""
    removed = []
    for store in archive.stores:
        for entry in store.entries():
            if entry.kind == "history":
                continue
            if segment_number(entry.name[:24], segment_size) < keep_from_segno:
                store.delete(entry.name)
                removed.append(entry.name)
        store.tidy()  # folders the pruning emptied
    return sorted(set(removed))


def archive_json(archive: WalArchive) -> str:
    return json.dumps(
        [
            {
                "name": e.name,
                "kind": e.kind,
                "archived_at": e.archived_at and e.archived_at.isoformat(),
            }
            for e in list_wal(archive)
        ],
        indent=2,
    )
