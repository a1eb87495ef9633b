"""Physical base backups for point-in-time recovery.

``pg_basebackup -Ft -X fetch -D -`` streams one tar (data files, the WAL needed for consistency
and the ``backup_manifest``) to stdout; it flows through compression and SHA-256 hashing into
``<backup_root>/<target>/base/base_<YYYYmmdd_HHMMSS>.tar.zst.partial`` and becomes a backup (the
same ``.sha256`` / ``.meta`` triple as logical backups) only with the final rename. ``.meta``
records the WAL range (start/end LSN, timeline, first segment needed), the server's clock at
start and end, and the server version, so PITR can pick the right base backup without opening it.
The server's configuration files kept outside the data directory (Debian's /etc/postgresql/...)
follow pg_basebackup's members in the same tar (``server_config``), listed in ``.meta``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
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
from backup_pipelines.engine.backup.files import (
    HashingSink,
    discard_failed_backup,
    ensure_target_dirs,
    target_lock,
)
from backup_pipelines.engine.backup.server_config import (
    CapturedFile,
    TarEndCutter,
    capture_server_config,
    config_tar,
)
from backup_pipelines.engine.compression import CHUNK_SIZE, compressor
from backup_pipelines.engine.config import DEFAULT_COMPRESSION_LEVEL, Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.encryption import encryption_stage_factory
from backup_pipelines.engine.errors import BackupFailedError, IntegrityError
from backup_pipelines.engine.fsutil import ensure_private_dir, fsync_dir, open_private, partial_path
from backup_pipelines.engine.postgres import connect, find_tools, server_major
from backup_pipelines.engine.processes import one_line, spawn
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
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
    # Where the server kept its data and the configuration files captured into the tar because
    # they live outside it (Debian: /etc/postgresql/<ver>/<cluster>/), and what could not be.
    data_directory: str | None = None
    server_config: list[CapturedFile] = []
    server_config_missing: list[str] = []

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
    target: Target,
    *,
    log: Any = None,
    purpose: str = "scheduled",
    progress: ProgressReporter | None = None,
) -> BackupArtifact:
    """Take one base backup of the target's cluster; returns the new artifact. The bytes
    pg_basebackup has sent so far go to ``progress`` (default: lines in ``log``)."""
    log = log or logger
    progress = reporter_for(progress, log)
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
        server_config = capture_server_config(info, log=log)
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
                # The captured configuration files become the tar's last members.
                cutter = TarEndCutter()
                with progress.start("pg_basebackup") as meter:
                    while chunk := proc.stdout.read(CHUNK_SIZE):
                        tar_bytes += len(chunk)
                        write_stored(compress.compress(cutter.feed(chunk)))
                        meter.advance(len(chunk))
                    returncode = proc.wait()
                    messages = one_line(info.redact(stderr.text()))
                    if returncode != 0:
                        raise BackupFailedError(
                            f"pg_basebackup failed for target '{target.name}' "
                            f"({info.describe()}): {messages or f'exit status {returncode}'}",
                            hint="the backup role needs the REPLICATION attribute and a "
                            "'replication' line in pg_hba.conf; tablespaces are not supported "
                            "(tar to stdout)",
                        )
                    if not cutter.ended:
                        raise BackupFailedError(
                            f"pg_basebackup's tar for target '{target.name}' ended early "
                            f"(after {tar_bytes} bytes, no end-of-archive)"
                        )
                    write_stored(compress.compress(config_tar(server_config, started.timestamp())))
                    write_stored(compress.flush())
                if finish_stored is not None:
                    finish_stored()
                sink.commit()
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
                data_directory=server_config.data_directory,
                server_config=server_config.files,
                server_config_missing=server_config.missing,
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
