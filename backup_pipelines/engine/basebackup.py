"""Physical base backups for point-in-time recovery.

``pg_basebackup -Ft -X fetch -D -`` streams one tar (data files, the WAL needed for consistency
and the ``backup_manifest``) to stdout; it flows through compression and SHA-256 hashing into
``<backup_root>/<target>/base/base_<YYYYmmdd_HHMMSS>.tar.zst.partial`` and becomes a backup (the
same ``.sha256`` / ``.meta`` triple as logical backups) only with the final rename. ``.meta``
records the WAL range (start/end LSN, timeline, first segment needed), the server's clock at
start and end, and the server version, so PITR can pick the right base backup without opening it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pwd
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backup_pipelines.engine.artifacts import (
    BackupArtifact,
    BackupMeta,
    list_artifacts,
    load_artifact,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.compression import CHUNK_SIZE, compressor, decompress_chunks
from backup_pipelines.engine.config import DEFAULT_COMPRESSION_LEVEL, Target
from backup_pipelines.engine.encryption import decrypt_chunks, encryption_stage_factory
from backup_pipelines.engine.errors import (
    BackupFailedError,
    BackupPipelinesError,
    IntegrityError,
    ToolError,
)
from backup_pipelines.engine.fsutil import ensure_private_dir, fsync_dir, open_private, partial_path
from backup_pipelines.engine.pipeline import (
    HashingSink,
    discard_failed_backup,
    ensure_target_dirs,
    target_lock,
)
from backup_pipelines.engine.postgres import ConnectionInfo, connect, find_tools, server_major
from backup_pipelines.engine.processes import one_line, spawn
from backup_pipelines.engine.verify import CheckOutcome, check_checksum
from backup_pipelines.engine.version import TOOL_VERSION
from backup_pipelines.engine.wal import parse_lsn, pitr_settings, segment_of_lsn

logger = logging.getLogger("backup_pipelines")

BASE_SUBDIR = "base"
TAR_EXTENSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
_START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


class BaseBackupMeta(BackupMeta):
    """``.meta`` of a base backup: the logical fields plus the WAL range it needs."""

    kind: str = "base"
    start_lsn: str
    end_lsn: str
    timeline: int
    wal_segment_size: int
    first_wal_segment: str
    last_wal_segment: str
    archive_mode: str | None = None

    @property
    def consistent_at(self) -> datetime:
        """The earliest moment this backup can be recovered to (server clock, conservative)."""
        return self.finished_at


def base_backup_dir(target: Target) -> Path:
    return target.backup_dir / BASE_SUBDIR


def as_base(artifact: BackupArtifact) -> tuple[BackupArtifact, BaseBackupMeta]:
    meta = artifact.meta
    if not isinstance(meta, BaseBackupMeta):
        meta = BaseBackupMeta.model_validate(meta.model_dump())
    return artifact, meta


def list_base_backups(target: Target) -> list[tuple[BackupArtifact, BaseBackupMeta]]:
    """Complete base backups, newest first by recorded start time."""
    found = []
    for artifact in list_artifacts(base_backup_dir(target)):
        if artifact.meta.kind != "base":
            continue
        with contextlib.suppress(ValueError):
            found.append(as_base(artifact))
    return found


def load_base_backup(path: str | os.PathLike[str]) -> tuple[BackupArtifact, BaseBackupMeta]:
    artifact = load_artifact(path)
    if artifact.meta.kind != "base":
        raise IntegrityError(f"{artifact.path} is a {artifact.meta.kind} backup, not a base backup")
    return as_base(artifact)


def _server_facts(info: ConnectionInfo) -> dict[str, Any]:
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT now(), current_setting('server_version'), "
            "current_setting('server_version_num')::int, "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
            "current_setting('archive_mode'), current_setting('wal_level')"
        )
        row = cur.fetchone()
    assert row is not None
    now, version, version_num, segment_size, archive_mode, wal_level = row
    return {
        "now": now,
        "version": version,
        "version_num": version_num,
        "segment_size": int(segment_size),
        "archive_mode": archive_mode,
        "wal_level": wal_level,
    }


def _server_now(info: ConnectionInfo) -> datetime:
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT now()")
        row = cur.fetchone()
    assert row is not None
    return row[0]


def run_base_backup(
    target: Target, *, log: Any = None, purpose: str = "scheduled"
) -> BackupArtifact:
    """Take one base backup of the target's cluster; returns the new artifact."""
    log = log or logger
    settings = pitr_settings(target)
    info = ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )
    folder = base_backup_dir(target)
    ensure_target_dirs(target, log=log)
    ensure_private_dir(folder, what=f"base backup folder of target '{target.name}'", log=log)
    with target_lock(folder):
        facts = _server_facts(info)
        if facts["archive_mode"] == "off" or facts["wal_level"] == "minimal":
            raise BackupFailedError(
                f"{info.describe()} does not archive WAL (archive_mode={facts['archive_mode']}, "
                f"wal_level={facts['wal_level']}): a base backup alone cannot do point-in-time recovery",
                hint=f"enable archiving first (`backup-pipelines wal-setup {target.name}` prints the "
                "postgresql.conf lines), restart PostgreSQL, then take the base backup",
            )
        tools = find_tools(server_major(facts["version_num"]), target.settings.pg_bin_dir)
        # Same encryption as the target's logical backups; a missing key stops us here.
        stage_factory = encryption_stage_factory(target.settings.encryption)
        started: datetime = facts["now"]
        clock = time.monotonic()
        codec = settings.base_backup_compression
        extension = TAR_EXTENSIONS[codec] + (".gpg" if stage_factory is not None else "")
        final = _final_path(folder, started.astimezone(UTC), extension)
        log.info(f"Base backup of {info.describe()} (PostgreSQL {facts['version']}) to {final}")
        tmp = partial_path(final)
        sidecars = [final.with_name(final.name + ".sha256"), final.with_name(final.name + ".meta")]
        argv = [
            tools.path("pg_basebackup"),
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--verbose",
            "--no-password",
            f"--label=backup_pipelines {target.name} {started.isoformat()}",
        ]
        proc: subprocess.Popen[bytes] | None = None
        abort_stages: list[Any] = []
        try:
            with open_private(tmp) as handle:
                sink = HashingSink(handle)
                write_stored, finish_stored, encryption_meta = sink.write, None, {"mode": "none"}
                if stage_factory is not None:
                    write_stored, finish_stored, encryption_meta, *abort_stages = stage_factory(
                        sink
                    )
                compress = compressor(codec, DEFAULT_COMPRESSION_LEVEL[codec])
                proc, stderr = spawn(argv, env=info.child_env(), stdout=subprocess.PIPE)
                assert proc.stdout is not None
                tar_bytes = 0
                while chunk := proc.stdout.read(CHUNK_SIZE):
                    tar_bytes += len(chunk)
                    write_stored(compress.compress(chunk))
                write_stored(compress.flush())
                returncode = proc.wait()
                messages = one_line(info.redact(stderr.text()))
                if returncode != 0:
                    raise BackupFailedError(
                        f"pg_basebackup failed for target '{target.name}' ({info.describe()}): "
                        f"{messages or f'exit status {returncode}'}",
                        hint="the backup role needs the REPLICATION attribute and a 'replication' "
                        "line in pg_hba.conf; tablespaces are not supported (tar to stdout)",
                    )
                if finish_stored is not None:
                    finish_stored()
                handle.flush()
                os.fsync(handle.fileno())
            start = _START_RE.search(messages)
            end = _END_RE.search(messages)
            if not start or not end:
                raise BackupFailedError(
                    "pg_basebackup did not report its WAL start and end points: " + messages
                )
            start_lsn, timeline, end_lsn = start.group(1), int(start.group(2)), end.group(1)
            finished = _server_now(info)
            segment_size = facts["segment_size"]
            meta = BaseBackupMeta(
                tool_version=TOOL_VERSION,
                purpose=purpose,
                target=target.name,
                database="(cluster)",
                server=info.describe(),
                server_version=facts["version"],
                server_version_num=facts["version_num"],
                pg_dump_version=tools.version_string("pg_basebackup"),
                format="tar",
                compression=codec,
                compression_level=DEFAULT_COMPRESSION_LEVEL[codec],
                encryption=encryption_meta,
                file_name=final.name,
                size_bytes=sink.size,
                dump_bytes=tar_bytes,
                sha256=sink.digest.hexdigest(),
                started_at=started,
                finished_at=finished,
                duration_seconds=round(time.monotonic() - clock, 3),
                start_lsn=start_lsn,
                end_lsn=end_lsn,
                timeline=timeline,
                wal_segment_size=segment_size,
                first_wal_segment=segment_of_lsn(start_lsn, timeline, segment_size),
                last_wal_segment=segment_of_lsn(
                    max(parse_lsn(end_lsn) - 1, 0), timeline, segment_size
                ),
                archive_mode=facts["archive_mode"],
            )
            with open_private(sidecars[0]) as out:
                out.write(sha256_line(meta.sha256, final.name).encode())
                os.fsync(out.fileno())
            write_meta(sidecars[1], meta)
            os.replace(tmp, final)
            fsync_dir(folder)
        except BaseException as exc:
            raise discard_failed_backup(
                exc,
                what=f"the base backup of '{target.name}'",
                folder=folder,
                proc=proc,
                aborts=abort_stages,
                leftovers=[tmp, *sidecars],
            ) from None
    log.info(
        f"Base backup complete: {final.name}, {meta.size_bytes} bytes (tar {tar_bytes} bytes), "
        f"WAL {meta.start_lsn}..{meta.end_lsn} on timeline {timeline}, "
        f"first segment {meta.first_wal_segment}, {meta.duration_seconds:.1f}s"
    )
    return BackupArtifact(final, meta)


def _final_path(folder: Path, started: datetime, extension: str) -> Path:
    moment = started.replace(microsecond=0)
    while True:
        candidate = folder / f"base_{moment.strftime('%Y%m%d_%H%M%S')}{extension}"
        if not candidate.exists() and not partial_path(candidate).exists():
            return candidate
        moment = moment.fromtimestamp(moment.timestamp() + 1, UTC)


# --- reading a base backup back --------------------------------------------------------------


class _ChunkStream(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def extract_base_backup(artifact: BackupArtifact, meta: BaseBackupMeta, destination: Path) -> int:
    """Stream-extract into ``destination`` (an existing empty folder) while verifying the stored
    file's SHA-256; raises IntegrityError (after emptying ``destination``) on any mismatch."""
    import hashlib

    digest = hashlib.sha256()
    stored_size = 0

    def hashed() -> Iterator[bytes]:
        nonlocal stored_size
        for chunk in artifact.stored_chunks():
            digest.update(chunk)
            stored_size += len(chunk)
            yield chunk

    members = 0
    try:
        stored = hashed()
        if meta.encryption.get("mode", "none") != "none":
            stored = decrypt_chunks(
                meta.encryption, stored, name=artifact.path.name, target=meta.target
            )
        stream = io.BufferedReader(
            _ChunkStream(decompress_chunks(meta.compression, stored, name=artifact.path.name)),
            CHUNK_SIZE,
        )
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                archive.extract(member, destination, filter="data")
                members += 1
            # Drain the tar's end-of-archive blocks so the checksum covers the whole file.
            while stream.read(CHUNK_SIZE):
                pass
        if digest.hexdigest() != meta.sha256 or stored_size != meta.size_bytes:
            raise IntegrityError(
                f"{artifact.path.name}: SHA-256 mismatch (file {digest.hexdigest()[:16]}…, "
                f".meta {meta.sha256[:16]}…): the base backup was modified or damaged",
                hint="use another base backup (or its offsite copy)",
            )
        if (
            not (destination / "backup_manifest").exists()
            or not (destination / "global" / "pg_control").exists()
        ):
            raise IntegrityError(
                f"{artifact.path.name} does not contain a complete data directory "
                "(backup_manifest or global/pg_control missing)"
            )
    except tarfile.TarError as exc:
        empty_dir(destination)
        raise IntegrityError(f"{artifact.path.name} is not a readable tar archive: {exc}") from None
    except BaseException:
        empty_dir(destination)
        raise
    return members


def empty_dir(folder: Path) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def chown_tree(root: Path, user: str) -> None:
    """Give a restored data directory to the server's OS user (only possible, and needed, as root)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(root):
        os.lchown(folder, entry.pw_uid, entry.pw_gid)
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid)


def check_manifest(artifact: BackupArtifact, meta: BaseBackupMeta, target: Target) -> CheckOutcome:
    """Extract into a scratch folder and run ``pg_verifybackup`` against the backup's manifest
    (file sizes and checksums, and the WAL range parsed with pg_waldump)."""
    tools = find_tools(None, target.settings.pg_bin_dir)
    try:
        verifier = tools.path("pg_verifybackup")
    except ToolError as exc:
        return CheckOutcome("manifest", False, exc.message)
    scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=artifact.path.parent))
    try:
        try:
            members = extract_base_backup(artifact, meta, scratch)
        except BackupPipelinesError as exc:
            return CheckOutcome("manifest", False, exc.message)
        result = subprocess.run(
            [verifier, "--quiet", str(scratch)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            return CheckOutcome(
                "manifest",
                False,
                f"pg_verifybackup found problems in {artifact.path.name}: "
                + "; ".join(detail[:10]),
                {"members": members},
            )
        return CheckOutcome(
            "manifest",
            True,
            f"pg_verifybackup: every file matches backup_manifest and WAL {meta.start_lsn}..{meta.end_lsn} "
            f"parses ({members} tar members)",
            {"members": members},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_base_backup(artifact: BackupArtifact, target: Target) -> list[CheckOutcome]:
    """Checksum first (cheap); the manifest check only for a file whose checksum matches."""
    _, meta = as_base(artifact)
    outcomes = [check_checksum(artifact)]
    if outcomes[0].passed:
        outcomes.append(check_manifest(artifact, meta, target))
    return outcomes


@dataclass(frozen=True)
class BaseRetentionOutcome:
    kept: list[str]
    removed: list[str]
    wal_removed: list[str]
    oldest_kept_first_segment: str | None


def retained_base_backups(
    backups: list[tuple[BackupArtifact, BaseBackupMeta]], keep: int
) -> list[tuple[BackupArtifact, BaseBackupMeta]]:
    """The newest ``keep`` backups that did not fail verification (failed ones never count)."""
    usable = [(a, m) for a, m in backups if a.usable]
    return usable[:keep]
