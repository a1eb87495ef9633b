"""Offsite copies on S3: upload a backup with its sidecars, check the copy, catch up after outages.

Layout: ``s3://<bucket>/<prefix>/<target>/<file>`` plus ``<file>.sha256`` and ``<file>.meta``,
the same names as on disk. The data object goes first and ``.meta`` last, so an interrupted
upload never looks complete (``list_stored_backups`` needs both data and ``.meta``).

An upload is idempotent: when the object already exists with the size and SHA-256 the local
``.meta`` records (and its sidecars are there), nothing is sent again. When S3 cannot be
reached the local backup stays where it is, :class:`StorageUnreachableError` says so, and the
next :func:`sync_offsite` uploads every local backup still missing offsite.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    list_artifacts,
)
from backup_pipelines.engine.config import OffsiteSettings, Target
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError
from backup_pipelines.engine.progress import ProgressReporter, reporter_for
from backup_pipelines.engine.storage import (
    PART_SIZE_METADATA_KEY,
    ObjectInfo,
    PutResult,
    S3Storage,
    StorageError,
    checksums_match,
    expected_s3_checksum,
)
from backup_pipelines.engine.verify import CheckOutcome

logger = logging.getLogger("backup_pipelines")
CHECK_NAME = "offsite_copy_matches"


def offsite_bucket(settings: OffsiteSettings) -> str:
    bucket = settings.resolved_bucket()
    if not bucket:
        raise ConfigError(
            "no S3 bucket configured for offsite copies",
            hint="export S3_BACKUP_BUCKET=my-company-backups or set offsite.bucket for the target",
        )
    return bucket


def offsite_storage(target: Target, *, client: Any = None, **overrides: Any) -> S3Storage:
    """The S3 folder holding ``target``'s copies: ``s3://bucket/<prefix>/<target>/``."""
    settings = target.settings.offsite
    # One database of a server target: ``<prefix>/<target>/<database>/``.
    prefix = "/".join(p for p in (settings.prefix.strip("/"), target.storage_name) if p)
    options: dict[str, Any] = {
        "client": client,
        "storage_class": settings.storage_class,
        "server_side_encryption": None if settings.sse == "none" else settings.sse,
        "kms_key_id": settings.kms_key_id,
        "concurrency": settings.concurrency,
    }
    options.update(overrides)
    return S3Storage(offsite_bucket(settings), prefix, **options)


@dataclass
class UploadOutcome:
    artifact: BackupArtifact
    url: str
    uploaded: bool  # False: an identical copy was already there
    info: ObjectInfo
    put: PutResult | None = None


def _meta_for_upload(artifact: BackupArtifact) -> bytes:
    # The uploaded .meta is the local one as it is now, verification results included.
    return artifact.meta_path.read_bytes()


def already_stored(artifact: BackupArtifact, storage: S3Storage) -> ObjectInfo | None:
    """The remote object when it matches the local backup (size, SHA-256, sidecars present)."""
    name = artifact.path.name
    info = storage.head(name)
    if info is None or info.size != artifact.meta.size_bytes or info.sha256 != artifact.meta.sha256:
        return None
    if storage.head(name + SHA256_SUFFIX) is None or storage.head(name + META_SUFFIX) is None:
        return None
    if _globals_problem(artifact, storage) is not None:
        return None
    return info


def _globals_problem(artifact: BackupArtifact, storage: S3Storage) -> str | None:
    """What is wrong with the offsite copy of the backup's globals file (None: all there)."""
    entry = artifact.meta.globals
    if entry is None:
        return None
    url = storage.url(entry.file_name)
    info = storage.head(entry.file_name)
    if info is None:
        return f"{url} (the server's globals) is missing: the copy of the backup set is incomplete"
    if info.size != entry.size_bytes or info.sha256 != entry.sha256:
        return f"{url} differs from the globals file .meta records (size or SHA-256)"
    if storage.head(entry.file_name + SHA256_SUFFIX) is None:
        return f"{url}{SHA256_SUFFIX} is missing: the copy of the backup set is incomplete"
    return None


def upload_backup(
    artifact: BackupArtifact,
    storage: S3Storage,
    *,
    log: Any = None,
    progress: ProgressReporter | None = None,
) -> UploadOutcome:
    """Upload one local backup and its sidecars unless an identical copy is already there.
    The bytes S3 has received so far go to ``progress`` (default: lines in ``log``)."""
    log = log or logger
    progress = reporter_for(progress, log)
    name = artifact.path.name
    existing = already_stored(artifact, storage)
    if existing is not None:
        log.info(f"{storage.url(name)} already holds this backup (same size and SHA-256)")
        return UploadOutcome(artifact, storage.url(name), False, existing)
    log.info(f"Uploading {artifact.path} ({artifact.meta.size_bytes} bytes) to {storage.url(name)}")
    with progress.start(f"Upload of {storage.url(name)}", artifact.meta.size_bytes) as meter:
        put = storage.put_file(
            artifact.path, name, expected_sha256=artifact.meta.sha256, progress=meter.advance
        )
    storage.put_file(artifact.sha256_path, name + SHA256_SUFFIX)
    globals_path = artifact.globals_path
    if globals_path is not None and artifact.meta.globals is not None:
        # Before the .meta: a listed offsite backup always has its globals beside it.
        storage.put_file(
            globals_path, globals_path.name, expected_sha256=artifact.meta.globals.sha256
        )
        storage.put_file(
            globals_path.with_name(globals_path.name + SHA256_SUFFIX),
            globals_path.name + SHA256_SUFFIX,
        )
    storage.put_bytes(name + META_SUFFIX, _meta_for_upload(artifact))
    info = storage.head(name)
    if (
        info is None
        or info.size != artifact.meta.size_bytes
        or not checksums_match(put.checksum_sha256, info.checksum_sha256)
    ):
        raise StorageError(
            f"{storage.url(name)} does not match what was uploaded (size or checksum differs)",
            hint="retry; if it repeats, something between this host and S3 alters the data",
        )
    log.info(
        f"Uploaded {storage.url(name)} in {put.parts} part(s) of {put.part_size} bytes, "
        f"checksum {put.checksum_sha256}, storage class {info.storage_class}, "
        f"SSE {info.server_side_encryption or 'none'}"
    )
    return UploadOutcome(artifact, storage.url(name), True, info, put)


def check_offsite_copy(artifact: BackupArtifact, storage: S3Storage) -> CheckOutcome:
    """Does S3 hold this backup exactly: size, our SHA-256 and S3's own checksum, sidecars?"""
    name = artifact.path.name
    url = storage.url(name)
    try:
        info = storage.head(name)
        if info is None:
            return CheckOutcome(
                CHECK_NAME, False, f"{url} is missing: the offsite copy was deleted", {"url": url}
            )
        details: dict[str, Any] = {
            "url": url,
            "size_bytes": info.size,
            "expected_size_bytes": artifact.meta.size_bytes,
            "s3_checksum_sha256": info.checksum_sha256 or "",
            "storage_class": info.storage_class or "",
            "server_side_encryption": info.server_side_encryption or "none",
        }
        if info.size != artifact.meta.size_bytes:
            return CheckOutcome(
                CHECK_NAME,
                False,
                f"{url} has {info.size} bytes, the local .meta records {artifact.meta.size_bytes}: "
                "the object was replaced or truncated",
                details,
            )
        if info.sha256 != artifact.meta.sha256:
            return CheckOutcome(
                CHECK_NAME,
                False,
                f"{url} carries SHA-256 {info.sha256 or '(none)'}, the local .meta records "
                f"{artifact.meta.sha256}: the object was replaced",
                details,
            )
        if not info.checksum_sha256:
            return CheckOutcome(
                CHECK_NAME,
                False,
                f"{url} has no S3 SHA-256 checksum: it was not written by backup_pipelines "
                "(replaced by another tool?)",
                details,
            )
        if artifact.is_local and artifact.path.exists():
            part_size = info.metadata.get(PART_SIZE_METADATA_KEY)
            expected = expected_s3_checksum(artifact.path, int(part_size) if part_size else None)
            details["expected_s3_checksum_sha256"] = expected
            if not checksums_match(expected, info.checksum_sha256):
                return CheckOutcome(
                    CHECK_NAME,
                    False,
                    f"{url}: S3's checksum {info.checksum_sha256} differs from the local file's "
                    f"{expected}: the object's content was replaced",
                    details,
                )
        for sidecar in (SHA256_SUFFIX, META_SUFFIX):
            if storage.head(name + sidecar) is None:
                return CheckOutcome(
                    CHECK_NAME, False, f"{url}{sidecar} is missing: the copy is incomplete", details
                )
        globals_problem = _globals_problem(artifact, storage)
        if globals_problem is not None:
            return CheckOutcome(CHECK_NAME, False, globals_problem, details)
        remote_meta = json.loads(storage.read_bytes(name + META_SUFFIX))
        if remote_meta.get("sha256") != artifact.meta.sha256:
            return CheckOutcome(
                CHECK_NAME, False, f"{url}{META_SUFFIX} describes a different backup", details
            )
    except BackupPipelinesError as exc:
        return CheckOutcome(CHECK_NAME, False, f"cannot check {url}: {exc.message}", {"url": url})
    return CheckOutcome(
        CHECK_NAME,
        True,
        f"{url} matches: {info.size} bytes, SHA-256 {artifact.meta.sha256[:16]}…, S3 checksum "
        f"{info.checksum_sha256}",
        details,
    )


@dataclass
class SyncReport:
    """What one offsite run did: uploads, copies already there, and what is still missing."""

    started_at: datetime
    outcomes: list[UploadOutcome] = field(default_factory=list)
    skipped_failed: list[str] = field(default_factory=list)
    error: BackupPipelinesError | None = None
    pending: list[str] = field(default_factory=list)

    @property
    def uploaded(self) -> list[UploadOutcome]:
        return [o for o in self.outcomes if o.uploaded]


def sync_offsite(
    target: Target,
    storage: S3Storage,
    *,
    first: BackupArtifact | None = None,
    log: Any = None,
    progress: ProgressReporter | None = None,
) -> SyncReport:
    """Upload ``first`` (the newest backup by default), then every local backup still missing.

    Backups that failed verification (or are damaged) are not uploaded. On an S3 error the report carries it in
    ``error`` and lists what is still ``pending``; nothing local is touched.
    """
    log = log or logger
    report = SyncReport(datetime.now(UTC))
    local = list_artifacts(target.backup_dir)
    if first is not None:
        local = [first, *[a for a in local if a.path != first.path]]
    queue = []
    for artifact in local:
        if not artifact.usable:  # failed verification, or damaged since
            report.skipped_failed.append(artifact.path.name)
            continue
        queue.append(artifact)
    for index, artifact in enumerate(queue):
        try:
            report.outcomes.append(upload_backup(artifact, storage, log=log, progress=progress))
        except BackupPipelinesError as exc:
            report.error = exc
            report.pending = [a.path.name for a in queue[index:]]
            # A warning: the caller reports the failure itself (one error per failed run).
            log.warning(
                f"offsite upload of {artifact.path.name} failed; the local backup is kept at "
                f"{artifact.path}: {exc.message}"
            )
            break
    return report


LIFECYCLE_RULE_PREFIX = "backup_pipelines"
# Sidecars (.sha256, .meta) are tiny; keeping them in STANDARD keeps listings and retention
# working while the data sits in Glacier (S3 does not transition objects under 128 KiB anyway).
LIFECYCLE_MIN_TRANSITION_BYTES = 128 * 1024


def lifecycle_rules(target: Target) -> list[dict[str, Any]]:
    """The bucket lifecycle rules for ``target``'s prefix, from its ``offsite.lifecycle``."""
    settings = target.settings.offsite
    lifecycle = settings.lifecycle
    prefix = "/".join(p for p in (settings.prefix.strip("/"), target.name) if p) + "/"
    rules: list[dict[str, Any]] = []
    transitions = [
        {"Days": days, "StorageClass": storage_class}
        for days, storage_class in (
            (lifecycle.glacier_after_days, "GLACIER"),
            (lifecycle.deep_archive_after_days, "DEEP_ARCHIVE"),
        )
        if days
    ]
    if transitions:
        rules.append(
            {
                "ID": f"{LIFECYCLE_RULE_PREFIX}-{target.name}-archive",
                "Status": "Enabled",
                "Filter": {
                    "And": {
                        "Prefix": prefix,
                        "ObjectSizeGreaterThan": LIFECYCLE_MIN_TRANSITION_BYTES,
                    }
                },
                "Transitions": transitions,
            }
        )
    expire: dict[str, Any] = {
        "ID": f"{LIFECYCLE_RULE_PREFIX}-{target.name}-expire",
        "Status": "Enabled",
        "Filter": {"Prefix": prefix},
    }
    if lifecycle.expire_after_days:
        expire["Expiration"] = {"Days": lifecycle.expire_after_days}
    if lifecycle.abort_incomplete_uploads_after_days:
        expire["AbortIncompleteMultipartUpload"] = {
            "DaysAfterInitiation": lifecycle.abort_incomplete_uploads_after_days
        }
    if len(expire) > 3:
        rules.append(expire)
    return rules


def lifecycle_warnings(target: Target) -> list[str]:
    """Conflicts between the lifecycle rule and calendar retention, in words."""
    lifecycle = target.settings.offsite.lifecycle
    retention = target.settings.retention
    warnings = []
    # With daily backups, the oldest monthly representative (the last backup of the month
    # `monthly - 1` months ago) is at most (monthly - 1) * 31 days old.
    longest = max((retention.monthly - 1) * 31 + 1, retention.weekly * 7, retention.daily)
    if lifecycle.expire_after_days and lifecycle.expire_after_days < longest:
        warnings.append(
            f"expire_after_days {lifecycle.expire_after_days} deletes offsite copies that "
            f"retention still keeps (up to {longest} days old with daily {retention.daily}, "
            f"weekly {retention.weekly}, monthly {retention.monthly})"
        )
    if lifecycle.glacier_after_days and lifecycle.glacier_after_days < 30:
        warnings.append("GLACIER needs objects to stay at least 30 days (early deletion fees)")
    return warnings


def apply_lifecycle(target: Target, storage: S3Storage) -> list[dict[str, Any]]:
    """Install ``target``'s rules, keeping every other rule of the bucket; returns all rules."""
    ours = lifecycle_rules(target)
    ids = {rule["ID"] for rule in ours}
    try:
        current = storage.call(
            f"read the lifecycle configuration of s3://{storage.bucket}",
            lambda: storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket),
        ).get("Rules", [])
    except StorageError as exc:
        if exc.code != "NoSuchLifecycleConfiguration":
            raise
        current = []
    rules = [rule for rule in current if rule.get("ID") not in ids] + ours
    storage.call(
        f"set the lifecycle configuration of s3://{storage.bucket}",
        lambda: storage.client.put_bucket_lifecycle_configuration(
            Bucket=storage.bucket, LifecycleConfiguration={"Rules": rules}
        ),
    )
    return rules


def base_backup_offsite_storage(target: Target, *, client: Any = None) -> S3Storage:
    """Where base backups are copied offsite: ``s3://<bucket>/<prefix>/<target>-pitr/base/``.

    A sibling of the logical backups' ``<prefix>/<target>/`` folder (target names cannot contain
    ``-``), so logical retention, listings and "restore latest" never see a base backup.
    """
    storage = offsite_storage(target, client=client)
    parts = (target.settings.offsite.prefix.strip("/"), f"{target.name}-pitr", "base")
    storage.prefix = "/".join(p for p in parts if p)
    return storage
