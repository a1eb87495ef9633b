"""The WAL archive: ``wal-push`` (PostgreSQL's ``archive_command``) and ``wal-fetch`` (its
``restore_command``), plus what monitoring and retention need to know about the archive.

    names.py      WAL file names, segment numbers, LSNs
    records.py    the ``.meta`` record of one archived file (the commit point)
    archive.py    WalArchive / WalStore: the archive's places, each a storage from engine/storage
    push.py       wal-push (durable before exit 0; identical -> ok, different -> refused)
    fetch.py      wal-fetch (both checksums verified; "not in the archive" reported distinctly)
    inventory.py  listing, gaps, newest segment, pruning
    setup.py      how PostgreSQL calls us: archive/restore command, postgresql.conf lines, folder
    spool.py      async mode: the spool the per-segment commands and the worker share (light)
    worker.py     async mode: the background worker pushing and prefetching through the spool

Contract with PostgreSQL (see the PostgreSQL docs, "Continuous Archiving"): ``wal-push`` reports
success only once the file is durably stored everywhere; ``wal-fetch`` exits 1 exactly when the
file is not in the archive. The CLI (``cli/pitr.py``) maps errors to those statuses.

PostgreSQL starts ``wal-push``/``wal-fetch`` once per WAL file, so the names below are imported
from their module on first use: ``wal-fetch`` loads fetch.py and what it needs, not push.py,
inventory.py or setup.py.
"""

from __future__ import annotations

import sys

# Neither typing nor importlib: async wal-push / wal-fetch import spool.py through this package
# once per WAL file, and pay for every import here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from backup_pipelines.engine.wal.archive import (
        WalArchive,
        WalStore,
        local_wal_storage,
        pitr_settings,
        resolve_pitr_target,
        s3_wal_storage,
        wal_archive_for,
    )
    from backup_pipelines.engine.wal.errors import WalConflictError, WalError, WalNotFoundError
    from backup_pipelines.engine.wal.fetch import FetchOutcome, wal_fetch
    from backup_pipelines.engine.wal.inventory import (
        WalGap,
        archive_json,
        find_gaps,
        list_wal,
        newest_segment,
        prune_wal,
    )
    from backup_pipelines.engine.wal.names import (
        DEFAULT_SEGMENT_SIZE,
        WalKind,
        format_lsn,
        object_stem,
        parse_lsn,
        segment_name,
        segment_number,
        segment_of_lsn,
        segments_per_log,
        timeline_of,
        wal_kind,
    )
    from backup_pipelines.engine.wal.push import PushOutcome, wal_push
    from backup_pipelines.engine.wal.records import (
        RECORD_SUFFIX,
        WAL_EXTENSIONS,
        WalEntry,
        WalRecord,
        record_name,
    )
    from backup_pipelines.engine.wal.setup import (
        archive_command,
        check_server_user_can_run,
        conf_quote,
        default_command,
        postgresql_conf_lines,
        restore_command,
        setup_archive_dir,
        tool_command,
    )

# name -> the module defining it
_EXPORTS = {
    "WalArchive": "archive",
    "WalStore": "archive",
    "local_wal_storage": "archive",
    "pitr_settings": "archive",
    "resolve_pitr_target": "archive",
    "s3_wal_storage": "archive",
    "wal_archive_for": "archive",
    "WalConflictError": "errors",
    "WalError": "errors",
    "WalNotFoundError": "errors",
    "FetchOutcome": "fetch",
    "wal_fetch": "fetch",
    "WalGap": "inventory",
    "archive_json": "inventory",
    "find_gaps": "inventory",
    "list_wal": "inventory",
    "newest_segment": "inventory",
    "prune_wal": "inventory",
    "DEFAULT_SEGMENT_SIZE": "names",
    "WalKind": "names",
    "format_lsn": "names",
    "object_stem": "names",
    "parse_lsn": "names",
    "segment_name": "names",
    "segment_number": "names",
    "segment_of_lsn": "names",
    "segments_per_log": "names",
    "timeline_of": "names",
    "wal_kind": "names",
    "PushOutcome": "push",
    "wal_push": "push",
    "RECORD_SUFFIX": "records",
    "WAL_EXTENSIONS": "records",
    "WalEntry": "records",
    "WalRecord": "records",
    "record_name": "records",
    "archive_command": "setup",
    "conf_quote": "setup",
    "default_command": "setup",
    "postgresql_conf_lines": "setup",
    "check_server_user_can_run": "setup",
    "restore_command": "setup",
    "setup_archive_dir": "setup",
    "tool_command": "setup",
}

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "RECORD_SUFFIX",
    "WAL_EXTENSIONS",
    "FetchOutcome",
    "PushOutcome",
    "WalArchive",
    "WalConflictError",
    "WalEntry",
    "WalError",
    "WalGap",
    "WalKind",
    "WalNotFoundError",
    "WalRecord",
    "WalStore",
    "archive_command",
    "archive_json",
    "conf_quote",
    "default_command",
    "find_gaps",
    "format_lsn",
    "list_wal",
    "local_wal_storage",
    "newest_segment",
    "object_stem",
    "parse_lsn",
    "pitr_settings",
    "postgresql_conf_lines",
    "check_server_user_can_run",
    "prune_wal",
    "record_name",
    "resolve_pitr_target",
    "restore_command",
    "s3_wal_storage",
    "segment_name",
    "segment_number",
    "segment_of_lsn",
    "segments_per_log",
    "setup_archive_dir",
    "timeline_of",
    "tool_command",
    "wal_archive_for",
    "wal_fetch",
    "wal_kind",
    "wal_push",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    qualified = f"{__name__}.{module}"
    __import__(qualified)
    value = getattr(sys.modules[qualified], name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
