"""Finding the backup to restore: ``latest`` (local first, then offsite), a path under the backup
root, or an ``s3://`` location in the target's bucket folder; and fetching a remote one once."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    list_artifacts,
    load_artifact,
    sha256_line,
    write_meta,
)
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.fsutil import open_private
from backup_pipelines.engine.listing import newest_backup
from backup_pipelines.engine.offsite import offsite_storage
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
from backup_pipelines.engine.restore.cleanup import work_tmp_dir
from backup_pipelines.engine.restore.errors import RestoreRefusedError
from backup_pipelines.engine.storage import (
    S3_SCHEME,
    RemoteBackupArtifact,
    S3Storage,
    list_stored_backups,
    open_backup,
    parse_s3_url,
)

# Backups that are not what an operator means by "the latest backup of the target".
NOT_LATEST_PURPOSES = frozenset({"pre-restore"})


def latest_local_backup(target: Target) -> BackupArtifact | None:
    """The newest complete local backup of ``target`` that is not known to be bad.

    Safety backups taken before a restore are skipped: "restore latest" must not bring back
    the state a previous restore just replaced. Backups dated in the future are skipped too
    (see :func:`~backup_pipelines.engine.listing.newest_backup`).
    """
    return newest_backup(list_artifacts(target.backup_dir), skip_purposes=NOT_LATEST_PURPOSES)


def configured_offsite_storage(target: Target) -> S3Storage | None:
    """The target's offsite folder ``s3://bucket/<prefix>/<target>/``; None when offsite is off."""
    if not target.settings.offsite.is_enabled:
        return None
    return offsite_storage(target)


def latest_offsite_backup(target: Target) -> BackupArtifact | None:
    """The newest usable offsite copy of ``target`` (None when offsite copies are off)."""
    storage = configured_offsite_storage(target)
    if storage is None:
        return None
    return newest_backup(list_stored_backups(storage), skip_purposes=NOT_LATEST_PURPOSES)


def _locate_s3(target: Target, location: str) -> BackupArtifact:
    bucket, key = parse_s3_url(location)
    storage = configured_offsite_storage(target)
    if storage is None:
        raise RestoreRefusedError(
            f"{location} is in S3, but target '{target.name}' has no offsite bucket configured",
            hint="set offsite.bucket for the target (or $S3_BACKUP_BUCKET)",
        )
    allowed = storage.url() + "/"
    if bucket != storage.bucket or not location.startswith(allowed):
        raise RestoreRefusedError(
            f"backup {location} is outside the configured bucket folder {allowed}",
            hint=f"restore only offsite copies of '{target.name}' under {allowed}",
        )
    return open_backup(location)


def locate_backup(config: ProjectConfig, target: Target, backup: str) -> BackupArtifact:
    """Open the backup an operator named: ``latest``, a local path or an ``s3://`` location.

    Local paths must lie under the configured backup root, so a typo or a stray file from
    elsewhere is never restored into a configured database.
    """
    spec = backup.strip()
    if not spec:
        raise RestoreRefusedError(
            "no backup given", hint="name a backup file, an s3:// location, or 'latest'"
        )
    if spec == "latest":
        # Local first (no download); the offsite copy when this host lost its backups.
        artifact = latest_local_backup(target) or latest_offsite_backup(target)
        if artifact is None:
            raise RestoreRefusedError(
                f"target '{target.name}' has no usable backup in {target.backup_dir}"
                + (" or offsite" if configured_offsite_storage(target) else ""),
                hint=f"take one with `backup-pipelines backup {target.name}` or name a backup file",
            )
        return artifact
    if spec.startswith(S3_SCHEME):
        return _locate_s3(target, spec)
    root = config.resolved_backup_root
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise RestoreRefusedError(
            f"backup {resolved} is outside the backup root {root}",
            hint=f"restore only backups kept under {root} (copy the file with its .sha256 and "
            f".meta into {root / target.name} first if you trust it)",
        )
    return load_artifact(resolved)


def check_backup_matches_target(artifact: BackupArtifact, target: Target, database: str) -> None:
    """Refuse a backup taken of another target or another database."""
    meta = artifact.meta
    if meta.target != target.name or meta.database != database:
        raise RestoreRefusedError(
            f"{Path(artifact.location).name} is a backup of database '{meta.database}' "
            f"(target '{meta.target}'), not of database '{database}' (target '{target.name}')",
            hint=f"choose a backup of '{target.name}' (`backup-pipelines list {target.name}`); "
            "to copy another database's data here on purpose, pass --allow-other-database "
            "(allow_other_database: true in the run config)",
        )


@contextlib.contextmanager
def local_copy(
    artifact: BackupArtifact,
    work_dir: Path,
    *,
    log: Any,
    progress: ProgressReporter | None = None,
) -> Iterator[BackupArtifact]:
    """A remote backup downloaded once, with its sidecars, into a private temporary folder.

    Fetched in parallel byte ranges straight to disk (memory stays flat) and checked against
    its recorded SHA-256 (a mismatch leaves nothing behind); verification and the restore then
    read the local file instead of downloading the object again, and pg_restore -j gets a seekable file.
    """
    if artifact.is_local:
        yield artifact
        return
    progress = reporter_for(progress, log)
    tmp_dir = work_tmp_dir(work_dir, "download")
    try:
        path = tmp_dir / artifact.path.name
        assert isinstance(artifact, RemoteBackupArtifact)
        with progress.start(f"Download of {artifact.location}", artifact.meta.size_bytes) as meter:
            recorded = artifact.download(path, progress=meter.advance)
        with open_private(path.with_name(path.name + SHA256_SUFFIX)) as handle:
            handle.write(sha256_line(recorded, path.name).encode())
        entry = artifact.meta.globals
        if entry is not None:
            # The globals file comes too (verify checks it, the restore creates roles from it);
            # a missing one is left missing here so that verification names it.
            globals_path = path.with_name(entry.file_name)
            try:
                with open_private(globals_path) as handle:
                    for chunk in artifact.globals_stored_chunks():
                        handle.write(chunk)
            except IntegrityError:
                globals_path.unlink(missing_ok=True)
            with contextlib.suppress(IntegrityError):
                recorded_globals = artifact.recorded_globals_sha256()
                with open_private(
                    globals_path.with_name(entry.file_name + SHA256_SUFFIX)
                ) as handle:
                    handle.write(sha256_line(recorded_globals, entry.file_name).encode())
        write_meta(path.with_name(path.name + META_SUFFIX), artifact.meta)
        yield BackupArtifact(path, artifact.meta)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
