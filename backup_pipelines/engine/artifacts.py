"""The backup triple: ``<file>``, ``<file>.sha256`` (sha256sum format) and ``<file>.meta`` (JSON).

A backup exists only once its data file has its final name; that rename is the last step of a
backup, so anything else (``.partial`` files, sidecars without data) is a leftover, never a backup.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX, write_atomic

META_SUFFIX = ".meta"
SHA256_SUFFIX = ".sha256"
# The server's globals beside a dump: ``<data file>.globals[.gz|.zst][.gpg]``. Never ends like a
# data file (see DATA_EXTENSIONS), so listings never mistake it for a backup.
GLOBALS_MARKER = ".globals"
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
# The .meta layout this version writes and understands. A newer layout may change what fields
# mean, so it is never read by guessing: such a backup is shown as unreadable, never trusted,
# and never deleted by retention.
META_VERSION = 1

_EXTENSIONS = {
    ("plain", "gzip"): ".sql.gz",
    ("plain", "zstd"): ".sql.zst",
    ("plain", "none"): ".sql",
    # Custom format compresses internally with gzip; zstd is applied around an uncompressed dump.
    ("custom", "gzip"): ".dump",
    ("custom", "zstd"): ".dump.zst",
    ("custom", "none"): ".dump",
    # Directory format: pg_dump's folder as one tar. gzip compresses each data file inside it
    # (pg_dump's workers); zstd is applied around the tar of uncompressed files.
    ("directory", "gzip"): ".dir.tar",
    ("directory", "zstd"): ".dir.tar.zst",
    ("directory", "none"): ".dir.tar",
}


def backup_extension(dump_format: str, compression: str, encrypted: bool = False) -> str:
    return _EXTENSIONS[(dump_format, compression)] + (".gpg" if encrypted else "")


# Every name ending a logical backup's data file, longest first (".sql.gz" before ".sql").
DATA_EXTENSIONS = tuple(
    sorted(
        {ext + gpg for ext in _EXTENSIONS.values() for gpg in ("", ".gpg")}, key=len, reverse=True
    )
)


def is_data_file_name(name: str) -> bool:
    """True for the name of a logical backup's data file (not a sidecar or a leftover)."""
    return name.endswith(DATA_EXTENSIONS)


def data_name_of_globals(name: str) -> str | None:
    """The data file a globals file (or its ``.sha256``) belongs to; None for other names."""
    if GLOBALS_MARKER not in name:
        return None
    return name[: name.rindex(GLOBALS_MARKER)]


def backup_file_name(database: str, started_at: datetime, extension: str) -> str:
    safe_db = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in database)
    return f"{safe_db}_{started_at.astimezone(UTC).strftime(TIMESTAMP_FORMAT)}{extension}"


class DatabaseGrant(BaseModel):
    """One privilege on the database itself (``GRANT CONNECT ON DATABASE ... TO ...``)."""

    grantee: str | None  # None: PUBLIC
    privilege: str
    grantable: bool = False


class DatabaseSetting(BaseModel):
    """One ``ALTER [ROLE r IN] DATABASE d SET key = value`` of the database."""

    role: str | None  # None: the database-wide setting
    setting: str  # "key=value", as pg_db_role_setting stores it


class DatabaseProperties(BaseModel):
    """What the database itself carries outside its dump: owner, privileges, settings.

    pg_dump without --create and pg_dumpall --globals-only both leave these out, so a restore
    onto a server that never had the database would lose them without this record."""

    owner: str
    default_acl: bool = True  # datacl IS NULL: the built-in defaults, no explicit grants
    grants: list[DatabaseGrant] = Field(default_factory=list)
    settings: list[DatabaseSetting] = Field(default_factory=list)


class GlobalsEntry(BaseModel):
    """The server's globals (``pg_dumpall --globals-only``) stored beside the dump."""

    model_config = ConfigDict(extra="allow")

    file_name: str
    size_bytes: int
    sha256: str
    sql_bytes: int
    compression: str
    encryption: dict[str, Any] = Field(default_factory=lambda: {"mode": "none"})
    pg_dumpall_version: str = ""
    roles: int = 0
    # False when the backup role may not read pg_authid: the roles are there, their password
    # hashes are not (pg_dumpall --no-role-passwords); the reason says why and what to do.
    role_passwords: bool = True
    role_passwords_reason: str | None = None
    database: DatabaseProperties | None = None


class BackupMeta(BaseModel):
    """What we know about one backup; written once beside it, updated only by verification."""

    # Unknown keys are kept so a newer tool's metadata survives a rewrite by an older one.
    model_config = ConfigDict(extra="allow")

    meta_version: int = 1
    tool: str = "backup_pipelines"
    tool_version: str
    kind: str = "logical"
    # Why it was taken: scheduled, manual, pre-restore, pre-rollback, ...
    purpose: str = "scheduled"
    target: str
    database: str
    server: str
    server_version: str
    server_version_num: int
    pg_dump_version: str
    format: str
    compression: str
    compression_level: int
    encryption: dict[str, Any] = Field(default_factory=lambda: {"mode": "none"})
    file_name: str
    size_bytes: int
    dump_bytes: int
    sha256: str
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    snapshot: str | None = None
    database_encoding: str | None = None
    database_collate: str | None = None
    database_ctype: str | None = None
    row_counts: dict[str, int] = Field(default_factory=dict)
    # "own": each table's own rows, as the dump holds them. Backups written before this field
    # existed counted an inheritance parent with its children's rows ("with_children"); their
    # restores are checked the same way.
    row_counts_scope: Literal["own", "with_children"] = "with_children"
    verification: dict[str, Any] | None = None
    # The server's globals captured with this backup; None for backups taken before globals
    # were captured (they still list, verify and restore, without recreating roles).
    globals: GlobalsEntry | None = None

    @property
    def row_counts_with_children(self) -> bool:
        return self.row_counts_scope == "with_children"

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    @property
    def compression_ratio(self) -> float:
        return self.dump_bytes / self.size_bytes if self.size_bytes else 0.0


def sha256_line(digest: str, file_name: str) -> str:
    return f"{digest}  {file_name}\n"


def parse_sha256_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise IntegrityError(
            f"checksum file missing: {path}",
            hint="the backup is incomplete or its sidecar was deleted; do not trust it",
        ) from None
    return parse_sha256_text(text, str(path))


def parse_sha256_text(text: str, source: str) -> str:
    """The digest of a sha256sum-format line; ``source`` names the file in the error."""
    text = text.strip()
    digest = text.split()[0] if text else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
        raise IntegrityError(f"checksum file {source} does not hold a SHA-256 digest")
    return digest.lower()


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        for chunk in read_chunks(handle, CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class BackupArtifact:
    """One backup on local disk: its data file and the metadata recorded beside it."""

    path: Path
    meta: BackupMeta

    @property
    def sha256_path(self) -> Path:
        return self.path.with_name(self.path.name + SHA256_SUFFIX)

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + META_SUFFIX)

    @property
    def globals_path(self) -> Path | None:
        """The server's globals stored with this backup (None for older backups)."""
        entry = self.meta.globals
        return self.path.with_name(entry.file_name) if entry is not None else None

    @property
    def sidecars(self) -> list[Path]:
        paths = [self.sha256_path, self.meta_path]
        if self.globals_path is not None:
            paths += [
                self.globals_path,
                self.globals_path.with_name(self.globals_path.name + SHA256_SUFFIX),
            ]
        return paths

    def globals_stored_chunks(self) -> Iterator[bytes]:
        """The stored bytes of the globals file (raises IntegrityError when it is missing)."""
        path = self.globals_path
        assert path is not None
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise IntegrityError(
                f"globals file missing: {path}",
                hint="the backup set is incomplete: the roles cannot be recreated from it on a "
                "new server; use another backup or the offsite copy",
            ) from None
        with handle:
            yield from read_chunks(handle)

    def recorded_globals_sha256(self) -> str:
        """The digest in the globals file's ``.sha256`` sidecar."""
        path = self.globals_path
        assert path is not None
        return parse_sha256_file(path.with_name(path.name + SHA256_SUFFIX))

    @property
    def is_local(self) -> bool:
        """True when ``path`` is a real local file (remote artifacts come from engine.storage)."""
        return True

    @property
    def location(self) -> str:
        """Where the backup lives: a local path, or ``s3://bucket/key`` for a remote copy."""
        return str(self.path)

    def recorded_sha256(self) -> str:
        """The digest in the ``.sha256`` sidecar (raises IntegrityError when missing/garbled)."""
        return parse_sha256_file(self.sha256_path)

    @property
    def status(self) -> str:
        """``verified``, ``unverified``, ``failed`` (the last verification recorded failed) or
        ``damaged`` (the cheap checks of :attr:`damage` found a problem since)."""
        if self.meta.verification and not self.meta.verification.get("passed"):
            return "failed"
        if self.damage is not None:
            return "damaged"
        return "verified" if self.meta.verification else "unverified"

    @property
    def usable(self) -> bool:
        """Not known to be bad: verified, or not verified yet."""
        return self.status in ("verified", "unverified")

    @cached_property
    def damage(self) -> str | None:
        """Why the backup is damaged, from checks that cost a ``stat`` and one small read: the
        file's size against ``.meta`` and the ``.sha256`` sidecar against ``.meta``. ``None``
        when they agree (only a full verification proves the content)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return "the data file is missing"
        if size != self.meta.size_bytes:
            return (
                f"the file has {size} bytes but .meta records {self.meta.size_bytes}: "
                "truncated or modified"
            )
        try:
            recorded = self.recorded_sha256()
        except IntegrityError as exc:
            if not self.sha256_path.exists():
                return f"{self.sha256_path.name} is missing"
            return exc.message
        if recorded != self.meta.sha256.lower():
            return f"{self.sha256_path.name} and {self.meta_path.name} record different checksums"
        globals_path = self.globals_path
        if globals_path is not None and self.meta.globals is not None:
            try:
                globals_size = globals_path.stat().st_size
            except FileNotFoundError:
                return f"the globals file {globals_path.name} is missing"
            if globals_size != self.meta.globals.size_bytes:
                return (
                    f"the globals file {globals_path.name} has {globals_size} bytes but .meta "
                    f"records {self.meta.globals.size_bytes}: truncated or modified"
                )
        return None

    def open_stored(self) -> BinaryIO:
        return self.path.open("rb")

    def stored_chunks(self) -> Iterator[bytes]:
        with self.open_stored() as handle:
            yield from read_chunks(handle)

    def record_check(self, name: str, passed: bool, message: str) -> BackupArtifact:
        """Store one verification outcome in ``.meta``; the backup is verified when all passed.

        Checks may run in parallel processes, so the read-modify-write happens under a lock.
        The ``.meta`` is replaced atomically: when it cannot be written (a full disk, a
        read-only folder) the previous one stays as it was and the error says so.
        """
        try:
            return self._record_check(name, passed, message)
        except OSError as exc:
            reason = (
                "the disk is full" if exc.errno == errno.ENOSPC else os.strerror(exc.errno or 0)
            )
            raise BackupPipelinesError(
                f"the verification result ({name}: {'passed' if passed else 'FAILED'}) could not "
                f"be recorded in {self.meta_path}: {reason}; the backup and its previous .meta "
                "are unchanged",
                hint=f"free space in (or fix the permissions of) {self.path.parent}, then run "
                f"`backup-pipelines verify {self.path}` again",
            ) from None

    def _record_check(self, name: str, passed: bool, message: str) -> BackupArtifact:
        lock_fd = os.open(
            self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            meta = read_meta(self.meta_path)
            verification = dict(meta.verification or {})
            checks = dict(verification.get("checks") or {})
            checks[name] = {
                "passed": passed,
                "message": message,
                "checked_at": datetime.now(UTC).isoformat(),
            }
            verification.update(
                checks=checks,
                passed=all(c["passed"] for c in checks.values()),
                checked_at=checks[name]["checked_at"],
            )
            meta = meta.model_copy(update={"verification": verification})
            write_meta(self.meta_path, meta)
        finally:
            os.close(lock_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path.with_name(self.path.name + ".lock"))
        return BackupArtifact(self.path, meta)


def write_meta(path: Path, meta: BackupMeta) -> None:
    write_atomic(path, (meta.model_dump_json(indent=2) + "\n").encode("utf-8"))


# Parsed .meta files by path, valid while the file is unchanged (same inode, size, mtime and
# ctime: every writer replaces the file atomically, so a rewrite is a new inode). Sensors list
# every target's backups on each tick; with the cache a tick stats the files instead of reading
# and parsing them again. BackupMeta is never modified in place (updates use model_copy).
_META_CACHE_SIZE = 20_000
_meta_cache: dict[Path, tuple[tuple[int, int, int, int], BackupMeta]] = {}
_meta_cache_lock = threading.Lock()


def read_meta(path: Path) -> BackupMeta:
    try:
        with path.open("rb") as handle:
            st = os.fstat(handle.fileno())
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with _meta_cache_lock:
                cached = _meta_cache.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            raw = handle.read()
    except FileNotFoundError:
        raise IntegrityError(
            f"metadata file missing: {path}",
            hint="the backup is incomplete or its sidecar was deleted; do not trust it",
        ) from None
    except OSError as exc:
        raise IntegrityError(f"metadata file {path} cannot be read: {exc.strerror}") from None
    meta = parse_meta(raw, str(path))
    with _meta_cache_lock:
        if len(_meta_cache) >= _META_CACHE_SIZE:
            _meta_cache.clear()
        _meta_cache[path] = (stamp, meta)
    return meta


def parse_meta(raw: bytes | str, source: str) -> BackupMeta:
    """A ``.meta`` document read from ``source`` (a path or URL, for the error message).

    Raises :class:`IntegrityError` with one line when it is not JSON, not a backup's metadata,
    or written in a layout this version does not know (``meta_version``)."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"metadata file {source} is not valid JSON (damaged?)") from None
    if not isinstance(document, dict):
        raise IntegrityError(f"metadata file {source} does not hold a backup's metadata")
    version = document.get("meta_version", META_VERSION)
    if version != META_VERSION:
        newer = (
            isinstance(version, int) and not isinstance(version, bool) and version > META_VERSION
        )
        raise IntegrityError(
            f"metadata file {source} has meta_version {version!r}, which this version of "
            f"backup_pipelines does not know (it reads {META_VERSION})"
            + ("; it was written by a newer version" if newer else ""),
            hint="upgrade backup_pipelines on this host to read it"
            if newer
            else "the .meta is damaged; restore it from the offsite copy",
        )
    try:
        return BackupMeta.model_validate(document)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:3]
        )
        raise IntegrityError(f"metadata file {source} is unreadable: {detail}") from None


def load_artifact(path: str | os.PathLike[str]) -> BackupArtifact:
    """Open an existing local backup by the path of its data file (or of its .meta/.sha256)."""
    data_path = Path(path).expanduser().resolve()
    for suffix in (META_SUFFIX, SHA256_SUFFIX):
        if data_path.name.endswith(suffix):
            data_path = data_path.with_name(data_path.name[: -len(suffix)])
    if data_path.name.endswith(PARTIAL_SUFFIX):
        raise IntegrityError(
            f"{data_path} is the leftover of an interrupted backup, not a backup",
            hint="use a complete backup (see `backup-pipelines list <target>`)",
        )
    if not data_path.exists():
        raise IntegrityError(f"backup file not found: {data_path}")
    return BackupArtifact(data_path, read_meta(data_path.with_name(data_path.name + META_SUFFIX)))


def list_artifacts(backup_dir: Path) -> list[BackupArtifact]:
    """Complete local backups in ``backup_dir``, newest first by their recorded start time."""
    if not backup_dir.is_dir():
        return []
    artifacts = []
    for meta_path in backup_dir.glob(f"*{META_SUFFIX}"):
        data_path = meta_path.with_name(meta_path.name[: -len(META_SUFFIX)])
        if not data_path.exists():
            continue
        try:
            artifacts.append(BackupArtifact(data_path, read_meta(meta_path)))
        except IntegrityError:
            continue
    artifacts.sort(key=lambda a: a.meta.started_at, reverse=True)
    return artifacts


@dataclass(frozen=True)
class UnreadableBackup:
    """A data file in a backup folder whose ``.meta`` is missing or cannot be trusted."""

    path: Path
    reason: str


def list_unreadable(backup_dir: Path) -> list[UnreadableBackup]:
    """Data files in ``backup_dir`` that :func:`list_artifacts` cannot list: no ``.meta``, or a
    ``.meta`` that is damaged or of an unknown ``meta_version``. Retention never touches them;
    listings show them so nothing is silently hidden."""
    if not backup_dir.is_dir():
        return []
    found = []
    for path in sorted(backup_dir.iterdir()):
        if not is_data_file_name(path.name) or not path.is_file():
            continue
        meta_path = path.with_name(path.name + META_SUFFIX)
        try:
            read_meta(meta_path)
        except IntegrityError as exc:
            # The folder is known to whoever lists it: name the file, not its whole path.
            found.append(
                UnreadableBackup(path, exc.message.replace(str(meta_path), meta_path.name))
            )
    return found


def list_partials(backup_dir: Path) -> list[Path]:
    if not backup_dir.is_dir():
        return []
    return sorted(backup_dir.glob(f"*{PARTIAL_SUFFIX}"))
