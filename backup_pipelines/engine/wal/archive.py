"""The WAL archive: ``wal-push`` (PostgreSQL's ``archive_command``) and ``wal-fetch``
(its ``restore_command``), plus what monitoring and retention need to know about the archive.

Contract with PostgreSQL (see the PostgreSQL docs, "Continuous Archiving"):

- ``wal-push`` reports success only once the file is durably stored: compressed, checksummed,
  fsynced and renamed into place locally; uploaded and confirmed by S3's checksum. A file that is
  already archived with *identical* content succeeds again (PostgreSQL re-archives after a crash);
  different content under the same name is refused and never overwritten.
- ``wal-fetch`` verifies both checksums while decompressing and reports "not in the archive"
  distinctly (exit status 1), which is how recovery learns it reached the end of the archive.

Layout (the same object names locally and under the S3 prefix)::

    <archive>/<timeline+log>/<segment><ext>          e.g. 0000000100000000/000000010000000000000003.zst
    <archive>/<timeline+log>/<segment>.meta          JSON record; written last = the commit point
    <archive>/history/<timeline>.history<ext> (+ .meta)

A data object without its ``.meta`` is the leftover of an interrupted push, never an archived file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from backup_pipelines.engine.compression import CHUNK_SIZE, compressor, decompress_chunks
from backup_pipelines.engine.config import (
    DEFAULT_COMPRESSION_LEVEL,
    PitrSettings,
    ProjectConfig,
    Target,
)
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError, IntegrityError
from backup_pipelines.engine.fsutil import (
    FILE_MODE,
    atomic_writer,
    ensure_private_dir,
    fsync_dir,
    open_private,
    partial_path,
    write_atomic,
)
from backup_pipelines.engine.version import TOOL_VERSION

logger = logging.getLogger("backup_pipelines")

DEFAULT_SEGMENT_SIZE = 16 << 20
RECORD_SUFFIX = ".meta"
WAL_EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}

_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
_BACKUP_LABEL = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")

WalKind = Literal["segment", "partial", "backup", "history"]


class WalError(BackupPipelinesError):
    """A WAL file could not be archived or fetched."""


class WalConflictError(WalError):
    """A *different* file is already archived under this name; it is never overwritten."""


class WalNotFoundError(WalError):
    """The requested file is not in the archive (normal at the end of recovery)."""


# --- names and positions ----------------------------------------------------------------------


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


# --- records ----------------------------------------------------------------------------------


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

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode("utf-8")


@dataclass(frozen=True)
class WalEntry:
    """One archived file as a listing sees it (no per-file reads)."""

    name: str
    kind: WalKind
    archived_at: datetime | None


@dataclass(frozen=True)
class Spool:
    """A compressed copy of the source file, with the checksums of both forms."""

    path: Path
    compression: str
    sha256: str
    size: int
    original_sha256: str
    original_size: int
    source_mtime: datetime


# --- backends ---------------------------------------------------------------------------------


class WalBackend:
    """One place holding archived WAL: a local folder or an S3 prefix."""

    description: str

    def read_record(self, name: str) -> WalRecord | None:
        raise NotImplementedError

    def store(self, record: WalRecord, spool: Spool) -> None:
        raise NotImplementedError

    def chunks(self, record: WalRecord) -> Iterator[bytes]:
        raise NotImplementedError

    def entries(self) -> list[WalEntry]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def check_available(self) -> None:
        """Raise WalError when the archive cannot be written right now."""


def _record_from_bytes(data: bytes, where: str) -> WalRecord:
    try:
        return WalRecord.model_validate(json.loads(data))
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"WAL archive record {where} is unreadable: {exc}") from None


class LocalWalBackend(WalBackend):
    """A folder written by ``archive_command`` (so owned by the server's OS user)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, object_name: str) -> Path:
        return self.root / object_name

    def check_available(self) -> None:
        # Never create the archive root: an unmounted archive volume must fail loudly instead
        # of filling the server's own disk.
        if not self.root.is_dir():
            raise WalError(
                f"WAL archive folder {self.root} does not exist (or is not mounted)",
                hint="create it for the server's OS user: `backup-pipelines wal-setup <target>` "
                f"or `install -d -o postgres -m 0700 {self.root}`",
            )
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise WalError(
                f"WAL archive folder {self.root} is not writable by this OS user (uid {os.geteuid()})",
                hint=f"chown it to the server's OS user: chown -R postgres: {self.root}",
            )

    def read_record(self, name: str) -> WalRecord | None:
        path = self._path(object_stem(name) + RECORD_SUFFIX)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _record_from_bytes(data, str(path))

    def store(self, record: WalRecord, spool: Spool) -> None:
        data_path = self._path(record.stored_name)
        # Runs for every segment: the archive root's sharing is reported once, by wal-setup.
        ensure_private_dir(data_path.parent, what="WAL archive folder", warn_shared=False)
        if spool.path.parent == data_path.parent:
            os.replace(spool.path, data_path)
            fsync_dir(data_path.parent)
        else:
            with (
                spool.path.open("rb") as source,
                atomic_writer(data_path) as out,  # fsyncs the file and its folder
            ):
                shutil.copyfileobj(source, out, CHUNK_SIZE)
        # The record is the commit point: without it the data file is only a leftover.
        write_atomic(self._path(object_stem(record.name) + RECORD_SUFFIX), record.to_bytes())

    def spool_dir(self, name: str) -> Path:
        return ensure_private_dir(
            self._path(object_stem(name)).parent, what="WAL archive folder", warn_shared=False
        )

    def chunks(self, record: WalRecord) -> Iterator[bytes]:
        try:
            handle = self._path(record.stored_name).open("rb")
        except FileNotFoundError:
            raise IntegrityError(
                f"{self._path(record.stored_name)} is missing although its record exists"
            ) from None
        with handle:
            while chunk := handle.read(CHUNK_SIZE):
                yield chunk

    def entries(self) -> list[WalEntry]:
        try:
            return self._entries()
        except PermissionError as exc:
            raise WalError(
                f"cannot read the WAL archive {self.root} as uid {os.geteuid()}: {exc.strerror}",
                hint="run monitoring and restores as root or as the server's OS user, or give "
                "this user read access through a shared group (chmod -R g+rX, 0750 folders)",
            ) from None

    def _entries(self) -> list[WalEntry]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.glob(f"*{RECORD_SUFFIX}"):
                name = path.name[: -len(RECORD_SUFFIX)]
                with contextlib.suppress(WalError, FileNotFoundError):
                    kind = wal_kind(name)
                    moment = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    found.append(WalEntry(name, kind, moment))
        return found

    def delete(self, name: str) -> None:
        record = self.read_record(name)
        # Record first: a file without a record is a leftover, never a half-deleted archive entry.
        with contextlib.suppress(FileNotFoundError):
            self._path(object_stem(name) + RECORD_SUFFIX).unlink()
        if record is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(record.stored_name).unlink()


class S3WalBackend(WalBackend):
    """An S3 prefix; an upload counts only once S3 confirmed its SHA-256 checksum."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        from backup_pipelines.engine.storage import S3Storage, parse_s3_url

        bucket, prefix = parse_s3_url(url)
        # Server-side encryption at rest for WAL (it holds every row change in clear).
        self.storage = S3Storage(
            bucket,
            prefix,
            client=client,
            server_side_encryption="AES256",
            attempts=3,
            backoff_seconds=0.3,
        )
        self.description = url

    def read_record(self, name: str) -> WalRecord | None:
        from backup_pipelines.engine.storage import StorageError

        object_name = object_stem(name) + RECORD_SUFFIX
        if self.storage.head(object_name) is None:
            return None
        try:
            data = self.storage.read_bytes(object_name)
        except StorageError:
            return None
        return _record_from_bytes(data, self.storage.url(object_name))

    def store(self, record: WalRecord, spool: Spool) -> None:
        result = self.storage.put_file(spool.path, record.stored_name)
        if result.sha256 != record.sha256:
            raise IntegrityError(
                f"the upload of {record.name} sent SHA-256 {result.sha256}, expected {record.sha256}"
            )
        info = self.storage.head(record.stored_name)
        if info is None or info.size != record.size:
            raise WalError(
                f"S3 does not show {self.storage.url(record.stored_name)} with {record.size} bytes "
                "after the upload; not reporting it as archived"
            )
        self.storage.put_bytes(object_stem(record.name) + RECORD_SUFFIX, record.to_bytes())

    def chunks(self, record: WalRecord) -> Iterator[bytes]:
        yield from self.storage.iter_chunks(record.stored_name)

    def entries(self) -> list[WalEntry]:
        found = []
        for info in self.storage.list():
            if not info.name.endswith(RECORD_SUFFIX):
                continue
            name = info.name.rsplit("/", 1)[-1][: -len(RECORD_SUFFIX)]
            with contextlib.suppress(WalError):
                found.append(WalEntry(name, wal_kind(name), info.modified))
        return found

    def delete(self, name: str) -> None:
        record = self.read_record(name)
        self.storage.delete(object_stem(name) + RECORD_SUFFIX)
        if record is not None:
            self.storage.delete(record.stored_name)


# --- the archive ------------------------------------------------------------------------------


@dataclass
class WalArchive:
    """Every place a target's WAL is archived to, in order (local first, then S3)."""

    target: str
    settings: PitrSettings
    backends: list[WalBackend]

    @property
    def primary(self) -> WalBackend:
        return self.backends[0]

    def describe(self) -> str:
        return " + ".join(b.description for b in self.backends)


def wal_archive_for(target: Target, *, s3_client: Any = None) -> WalArchive:
    settings = pitr_settings(target)
    backends: list[WalBackend] = []
    if settings.archive_dir is not None:
        backends.append(LocalWalBackend(settings.archive_dir))
    if settings.archive_s3 is not None:
        backends.append(S3WalBackend(settings.archive_s3, client=s3_client))
    return WalArchive(target.name, settings, backends)


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


# --- wal-push ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushOutcome:
    name: str
    stored: list[str]
    already_archived: list[str]
    original_size: int
    size: int


def _spool(source: Path, folder: Path, name: str, codec: str) -> Spool:
    """Compress ``source`` into ``folder`` (a ``.partial`` file), hashing both forms."""
    final = folder / (name + WAL_EXTENSIONS[codec])
    tmp = partial_path(final)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    stored_digest, original_digest = hashlib.sha256(), hashlib.sha256()
    stored_size = original_size = 0
    compress = compressor(codec, DEFAULT_COMPRESSION_LEVEL[codec])
    try:
        with source.open("rb") as handle:
            mtime = datetime.fromtimestamp(os.fstat(handle.fileno()).st_mtime, UTC)
            with open_private(tmp) as out:
                while chunk := handle.read(CHUNK_SIZE):
                    original_digest.update(chunk)
                    original_size += len(chunk)
                    data = compress.compress(chunk)
                    if data:
                        stored_digest.update(data)
                        stored_size += len(data)
                        out.write(data)
                data = compress.flush()
                stored_digest.update(data)
                stored_size += len(data)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return Spool(
        tmp,
        codec,
        stored_digest.hexdigest(),
        stored_size,
        original_digest.hexdigest(),
        original_size,
        mtime,
    )


def _stored_intact(backend: WalBackend, record: WalRecord) -> bool:
    digest = hashlib.sha256()
    try:
        for chunk in backend.chunks(record):
            digest.update(chunk)
    except BackupPipelinesError:
        return False
    return digest.hexdigest() == record.sha256


def wal_push(archive: WalArchive, source: Path, name: str | None = None) -> PushOutcome:
    """Archive one file PostgreSQL handed to ``archive_command``. Raises on anything short of
    "durably stored everywhere"; the caller maps that to a non-zero exit status."""
    name = name or source.name
    wal_kind(name)
    if not source.is_file():
        raise WalError(f"{source} does not exist or is not a file", hint="pass %p unchanged")
    for backend in archive.backends:
        backend.check_available()
    codec = archive.settings.wal_compression
    local = next((b for b in archive.backends if isinstance(b, LocalWalBackend)), None)
    spool_folder = (
        local.spool_dir(name) if local is not None else Path(tempfile.mkdtemp(prefix="bp-wal-"))
    )
    spool = _spool(source, spool_folder, name, codec)
    stored: list[str] = []
    already: list[str] = []
    try:
        record = WalRecord(
            name=name,
            stored_name=object_stem(name) + WAL_EXTENSIONS[codec],
            compression=codec,
            sha256=spool.sha256,
            size=spool.size,
            original_sha256=spool.original_sha256,
            original_size=spool.original_size,
            archived_at=datetime.now(UTC),
            source_mtime=spool.source_mtime,
        )
        # S3 first, the local rename last: the local copy's record then never claims more than
        # every configured place holds.
        for backend in sorted(archive.backends, key=lambda b: isinstance(b, LocalWalBackend)):
            existing = backend.read_record(name)
            if existing is not None:
                if existing.original_sha256 != spool.original_sha256:
                    raise WalConflictError(
                        f"wal-push refused {name}: {backend.description} already holds a DIFFERENT "
                        f"file under this name (archived sha256 {existing.original_sha256[:16]}…, "
                        f"{existing.original_size} bytes; this file sha256 "
                        f"{spool.original_sha256[:16]}…, {spool.original_size} bytes). "
                        "Nothing was overwritten.",
                        hint="two clusters probably archive into the same place (a restored copy or "
                        "a second server): give each cluster its own archive_dir/archive_s3",
                    )
                if _stored_intact(backend, existing):
                    already.append(backend.description)
                    continue
                logger.warning(
                    f"wal-push: the archived copy of {name} in {backend.description} is damaged; "
                    "replacing it with the identical original"
                )
            backend.store(record, spool)
            stored.append(backend.description)
    finally:
        with contextlib.suppress(FileNotFoundError):
            spool.path.unlink()
        if local is None:
            shutil.rmtree(spool_folder, ignore_errors=True)
    return PushOutcome(name, stored, already, spool.original_size, spool.size)


# --- wal-fetch --------------------------------------------------------------------------------


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
    for backend in archive.backends:
        try:
            record = backend.read_record(name)
        except IntegrityError as exc:
            problems.append(exc.message)
            found_any = True
            continue
        if record is None:
            continue
        found_any = True
        try:
            size = _restore_file(backend, record, destination)
        except IntegrityError as exc:
            problems.append(exc.message)
            logger.error(f"wal-fetch: {exc.message}")
            continue
        return FetchOutcome(name, backend.description, size)
    if not found_any:
        raise WalNotFoundError(f"{name} is not in the WAL archive ({archive.describe()})")
    raise IntegrityError(
        f"wal-fetch refused {name}: every archived copy is damaged: " + "; ".join(problems),
        hint="recovery cannot continue past this file; restore to an earlier time or use "
        "another copy of the archive",
    )


def _restore_file(backend: WalBackend, record: WalRecord, destination: Path) -> int:
    tmp = destination.with_name(destination.name + ".bp-fetch")
    stored_digest, original_digest = hashlib.sha256(), hashlib.sha256()
    original_size = 0

    def stored_chunks() -> Iterator[bytes]:
        for chunk in backend.chunks(record):
            stored_digest.update(chunk)
            yield chunk

    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            for chunk in decompress_chunks(
                record.compression, stored_chunks(), name=f"{backend.description}: {record.name}"
            ):
                original_digest.update(chunk)
                original_size += len(chunk)
                out.write(chunk)
        if stored_digest.hexdigest() != record.sha256:
            raise IntegrityError(
                f"{backend.description}: {record.stored_name} does not match its recorded "
                f"SHA-256 (got {stored_digest.hexdigest()[:16]}…, recorded {record.sha256[:16]}…)"
            )
        if original_digest.hexdigest() != record.original_sha256 or (
            original_size != record.original_size
        ):
            raise IntegrityError(
                f"{backend.description}: {record.name} decompresses to different content than "
                "was archived"
            )
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return original_size


# --- what is in the archive -------------------------------------------------------------------


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
    for backend in archive.backends:
        for entry in backend.entries():
            if entry.kind == "history":
                continue
            if segment_number(entry.name[:24], segment_size) < keep_from_segno:
                backend.delete(entry.name)
                removed.append(entry.name)
        if isinstance(backend, LocalWalBackend) and backend.root.is_dir():
            for folder in backend.root.iterdir():
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds for folders the pruning emptied
    return sorted(set(removed))


# --- how PostgreSQL calls us -------------------------------------------------------------------


def default_command() -> str:
    """This installation's ``backup-pipelines`` executable, as an absolute path."""
    beside = Path(sys.executable).parent / "backup-pipelines"
    if beside.exists():
        return str(beside)
    found = shutil.which("backup-pipelines")
    return found or "backup-pipelines"


def tool_command(config: ProjectConfig, target: Target) -> str:
    settings = pitr_settings(target)
    prefix = settings.command or shlex.quote(default_command())
    if config.source_path is None:
        return prefix
    return f"{prefix} --config {shlex.quote(str(config.source_path))}"


def archive_command(config: ProjectConfig, target: Target) -> str:
    return f"{tool_command(config, target)} wal-push --target {target.name} %p"


def restore_command(config: ProjectConfig, target: Target) -> str:
    return f"{tool_command(config, target)} wal-fetch --target {target.name} %f %p"


def conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def postgresql_conf_lines(
    config: ProjectConfig, target: Target, archive_timeout_seconds: int = 60
) -> list[str]:
    """The lines that turn on archiving into this target's WAL archive."""
    return [
        "wal_level = replica",
        "archive_mode = on",
        f"archive_command = {conf_quote(archive_command(config, target))}",
        f"archive_timeout = {archive_timeout_seconds}s",
    ]


def setup_archive_dir(path: Path, server_os_user: str) -> Path:
    """Create the local archive folder (0700) owned by the server's OS user.

    A folder that already exists keeps its owner and mode (someone chose them); it is only
    checked: a warning says when the server's OS user apparently cannot write it.
    """
    import pwd

    entry = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(server_os_user)
        except KeyError:
            raise ConfigError(
                f"OS user {server_os_user!r} does not exist",
                hint="set pitr.server_os_user to the user PostgreSQL runs as",
            ) from None
    existed = path.exists()
    # Missing parents get 0711: the server's OS user must reach the archive through them.
    ensure_private_dir(path, what="WAL archive folder (pitr.archive_dir)", parent_mode=0o711)
    if entry is not None and existed:
        if not _writable_by(path, entry):
            logger.warning(
                f"WAL archive folder {path} exists and {server_os_user} apparently cannot write "
                f"it: archiving will fail until you run `chown {server_os_user}: {path}` (its "
                "owner and mode were left as they are)"
            )
    elif entry is not None:
        os.chown(path, entry.pw_uid, entry.pw_gid)
        # The server user must be able to reach the folder through its parents.
        parent = path.parent
        while parent != parent.parent:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                logger.warning(
                    f"{parent} is not searchable by other users: {server_os_user} may be unable "
                    f"to reach {path} (chmod o+x {parent})"
                )
                break
            parent = parent.parent
    return path


def _writable_by(path: Path, user: Any) -> bool:
    """Whether ``user`` (a pwd entry) may create files in ``path``, judged from its mode bits."""
    import grp

    info = path.stat()
    if info.st_uid == user.pw_uid:
        return info.st_mode & 0o300 == 0o300
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if info.st_gid in groups:
        return info.st_mode & 0o030 == 0o030
    return info.st_mode & 0o003 == 0o003


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
