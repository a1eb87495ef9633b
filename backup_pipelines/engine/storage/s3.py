"""An S3 bucket prefix behind the storage interface: streaming multipart uploads with SHA-256
checksums the server confirms, resumable downloads, storage classes and server-side encryption.

The S3 client comes from the caller (e.g. dagster-aws ``S3Resource.get_client()``) or is built
by :func:`~backup_pipelines.engine.storage.retry.default_s3_client`, which honours
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (so tests can point it at a local moto server) and
the usual ``AWS_*`` credentials. boto3 is imported only when a client is first needed: the WAL
commands of a cluster without S3 never load it. Retries: see ``retry.py`` (one policy).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from backup_pipelines.engine.compression import CHUNK_SIZE
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.fsutil import atomic_writer
from backup_pipelines.engine.storage.base import (
    BackupStorage,
    ObjectInfo,
    ObjectNotFoundError,
    Progress,
    PutResult,
    StorageError,
    StorageUnreachableError,
    check_name,
    require_digest,
    require_download_digest,
)
from backup_pipelines.engine.storage.retry import (
    DOWNLOAD_RESUMES,
    RESUME_BACKOFF_SECONDS,
    default_s3_client,
    is_stream_error,
    is_transient,
    s3_error,
)
from backup_pipelines.engine.storage.s3_multipart import (
    DEFAULT_CONCURRENCY,
    MAX_CONCURRENCY,
    MAX_PARTS,
    MIN_PART_SIZE,
    SHA256_METADATA_KEY,
    checksums_match,
    part_size_for,
    put_multipart,
    single_checksum,
)

S3_SCHEME = "s3://"

T = TypeVar("T")


class S3Storage(BackupStorage):
    """Objects under ``s3://bucket/prefix/``: streaming multipart uploads with SHA-256 checksums.

    ``storage_class`` (``STANDARD_IA``, ``GLACIER_IR``, ...) and ``server_side_encryption``
    (``AES256`` or ``aws:kms`` with ``kms_key_id``) apply to every upload. Each request is
    retried by botocore (``retry.py``); a download whose body breaks is resumed at most
    ``resume_attempts`` times, pausing ``backoff_seconds`` (doubling) in between.
    ``concurrency`` parts travel at once in both directions (``put_file``, ``get_file``).
    ``min_part_size`` / ``max_parts`` exist so tests can exercise part sizing with small files.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        storage_class: str | None = None,
        server_side_encryption: str | None = None,
        kms_key_id: str | None = None,
        resume_attempts: int = DOWNLOAD_RESUMES,
        backoff_seconds: float = RESUME_BACKOFF_SECONDS,
        min_part_size: int = MIN_PART_SIZE,
        max_parts: int = MAX_PARTS,
        concurrency: int = DEFAULT_CONCURRENCY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not bucket:
            raise StorageError(
                "no S3 bucket configured", hint="set S3_BACKUP_BUCKET or offsite.bucket"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self.storage_class = storage_class
        self.server_side_encryption = server_side_encryption
        self.kms_key_id = kms_key_id
        self.resume_attempts = max(0, resume_attempts)
        self.backoff_seconds = backoff_seconds
        self.min_part_size = min_part_size
        self.max_parts = max_parts
        self.concurrency = max(1, min(concurrency, MAX_CONCURRENCY))
        self._sleep = sleep

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = default_s3_client()
        return self._client

    def _join(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def key(self, name: str) -> str:
        """The S3 key of the object ``name``."""
        return self._join(check_name(name))

    def url(self, name: str = "") -> str:
        key = self._join(name) if name else self.prefix
        return f"{S3_SCHEME}{self.bucket}/{key}" if key else f"{S3_SCHEME}{self.bucket}"

    def with_prefix(self, sub: str) -> S3Storage:
        """The same bucket and settings, one folder deeper."""
        clone = object.__new__(S3Storage)
        clone.__dict__.update(self.__dict__)
        clone.prefix = self._join(sub.strip("/")).strip("/")
        return clone

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 request (botocore retries it, see ``retry.py``); a final failure becomes
        a StorageError naming ``what``."""
        try:
            return fn()
        except Exception as exc:
            error = s3_error(what, exc, self._client)
            if error is None:
                raise
            raise error from None

    def extra_args(self, metadata: dict[str, str] | None) -> dict[str, Any]:
        """Upload arguments every object gets: metadata, storage class, encryption."""
        args: dict[str, Any] = {}
        if metadata:
            args["Metadata"] = metadata
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.server_side_encryption:
            args["ServerSideEncryption"] = self.server_side_encryption
            if self.server_side_encryption == "aws:kms" and self.kms_key_id:
                args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def result(
        self, name: str, size: int, sha256: str, checksum: str, parts: int, part_size: int
    ) -> PutResult:
        return PutResult(
            name,
            self.url(name),
            size,
            sha256,
            checksum,
            parts,
            part_size,
            self.storage_class or "STANDARD",
            self.server_side_encryption,
            self.kms_key_id,
        )

    def confirm(self, name: str, expected: str, reported: str | None) -> None:
        """Refuse (and delete) an object whose server-computed checksum is not ours."""
        # moto and S3 both report the checksum they computed; a mismatch means bytes changed
        # on the way, so the object must not count as stored.
        if reported and not checksums_match(expected, reported):
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
            raise IntegrityError(
                f"S3 stored {self.url(name)} with checksum {reported}, expected {expected}; "
                "the object was deleted",
                hint="retry the upload; if it repeats, check proxies between this host and S3",
            )

    def put_bytes(
        self,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> PutResult:
        digest = hashlib.sha256(data)
        checksum = single_checksum(digest.digest())
        meta = {SHA256_METADATA_KEY: digest.hexdigest(), **(metadata or {})}
        response = self.call(
            f"upload {self.url(name)}",
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self.key(name),
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
                **self.extra_args(meta),
            ),
        )
        self.confirm(name, checksum, response.get("ChecksumSHA256"))
        if progress is not None:
            progress(len(data))
        return self.result(name, len(data), digest.hexdigest(), checksum, 1, len(data))

    def put_file(
        self,
        source: Path,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
        move: bool = False,
    ) -> PutResult:
        """Stream ``source`` to S3, in parts sent concurrently (see ``put_multipart``)."""
        size = source.stat().st_size
        part_size = part_size_for(size, min_part_size=self.min_part_size, max_parts=self.max_parts)
        if size <= part_size:
            # Small enough for one request; the object still gets a SHA-256 checksum.
            data = source.read_bytes()
            require_digest(source, hashlib.sha256(data).hexdigest(), expected_sha256)
            return self.put_bytes(name, data, metadata=metadata, progress=progress)
        return put_multipart(
            self,
            source,
            name,
            part_size=part_size,
            metadata=metadata,
            expected_sha256=expected_sha256,
            progress=progress,
        )

    def iter_chunks(
        self, name: str, chunk_size: int = CHUNK_SIZE, *, progress: Progress | None = None
    ) -> Iterator[bytes]:
        """Stream an object; a dropped connection resumes where it stopped (Range request)."""
        return self._stream(name, chunk_size=chunk_size, progress=progress)

    def _stream(
        self,
        name: str,
        *,
        start: int = 0,
        end: int | None = None,
        etag: str | None = None,
        chunk_size: int = CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (inclusive; None: to the end) of the object. A body that
        breaks is resumed from the byte it reached, at most ``resume_attempts`` times."""
        response = self._get(name, start=start, end=end, if_match=etag)
        etag = etag or response.get("ETag")
        offset = start
        resumes = 0
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = body.read(chunk_size)
                except Exception as exc:
                    if not is_transient(exc) and not is_stream_error(exc):
                        raise
                    if resumes >= self.resume_attempts:
                        raise StorageUnreachableError(
                            f"download of {self.url(name)} kept failing after {offset} bytes "
                            f"({resumes} resumed): {exc}",
                            hint="check the network and retry",
                        ) from None
                    resumes += 1
                    body.close()
                    self._sleep(self.backoff_seconds * 2 ** (resumes - 1))
                    # If-Match: never splice bytes of a replaced object onto the old ones.
                    body = self._get(name, start=offset, end=end, if_match=etag)["Body"]
                    continue
                if not chunk:
                    return
                offset += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk
        finally:
            body.close()

    def get_file(
        self,
        name: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Download ``name`` to ``dest``: byte ranges of one part size fetched by up to
        ``concurrency`` requests at once, each written at its place in a temporary file (memory:
        one read buffer per request). The SHA-256 is computed in order as ranges complete, while
        later ones are still arriving; the file is renamed into place only when it matches
        ``expected_sha256``. Every range asks for the same ETag, so a replaced object fails
        instead of being spliced."""
        info = self.head(name)
        if info is None:
            raise ObjectNotFoundError(f"{self.url(name)} does not exist")
        part = part_size_for(info.size, min_part_size=self.min_part_size, max_parts=self.max_parts)
        if info.size <= part or self.concurrency <= 1:
            return super().get_file(name, dest, expected_sha256=expected_sha256, progress=progress)
        ranges = [(start, min(start + part, info.size) - 1) for start in range(0, info.size, part)]
        digest = hashlib.sha256()
        with (
            atomic_writer(dest, readable=True) as handle,
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-download") as pool,
        ):
            fd = handle.fileno()
            futures = [
                pool.submit(self._fetch_range, name, fd, start, end, info.etag)
                for start, end in ranges
            ]
            try:
                for (start, end), future in zip(ranges, futures, strict=True):
                    future.result()
                    # Hash what is on disk, in order: the page cache serves it back cheaply.
                    offset = start
                    while offset <= end:
                        chunk = os.pread(fd, min(CHUNK_SIZE, end + 1 - offset), offset)
                        digest.update(chunk)
                        offset += len(chunk)
                    if progress is not None:
                        progress(end + 1 - start)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            require_download_digest(self.url(name), digest.hexdigest(), expected_sha256)
        return digest.hexdigest()

    def _fetch_range(self, name: str, fd: int, start: int, end: int, etag: str | None) -> None:
        offset = start
        for chunk in self._stream(name, start=start, end=end, etag=etag):
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)
        if offset != end + 1:
            raise StorageError(
                f"download of {self.url(name)} ended at byte {offset}, expected {end + 1}",
                hint="retry; if it repeats, check proxies between this host and S3",
            )

    def _get(
        self,
        name: str,
        *,
        start: int = 0,
        end: int | None = None,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end}"
        if if_match:
            extra["IfMatch"] = if_match
        try:
            return self.call(
                f"download {self.url(name)}",
                lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra),
            )
        except StorageError as exc:
            if exc.code in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFoundError(f"{self.url(name)} does not exist") from None
            if exc.code == "PreconditionFailed":
                raise StorageError(
                    f"{self.url(name)} was replaced while it was being read",
                    hint="retry; if it keeps changing, something else writes to this location",
                    code="PreconditionFailed",
                ) from None
            if exc.code == "InvalidObjectState":
                raise StorageError(
                    f"{self.url(name)} is archived (Glacier / Deep Archive) and cannot be read yet",
                    hint="restore it first: aws s3api restore-object --bucket ... --key ... "
                    "--restore-request Days=3, then retry once it is available",
                    code="InvalidObjectState",
                ) from None
            raise

    def head(self, name: str) -> ObjectInfo | None:
        try:
            response = self.call(
                f"inspect {self.url(name)}",
                lambda: self.client.head_object(
                    Bucket=self.bucket, Key=self.key(name), ChecksumMode="ENABLED"
                ),
            )
        except StorageError as exc:
            if exc.code in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        metadata = {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}
        return ObjectInfo(
            name=name,
            size=int(response["ContentLength"]),
            modified=response.get("LastModified"),
            sha256=metadata.get(SHA256_METADATA_KEY),
            checksum_sha256=response.get("ChecksumSHA256"),
            storage_class=response.get("StorageClass") or "STANDARD",
            server_side_encryption=response.get("ServerSideEncryption"),
            kms_key_id=response.get("SSEKMSKeyId"),
            metadata=metadata,
            etag=response.get("ETag"),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        infos = []
        root = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": root + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            response = self.call(
                f"list {self.url(prefix)}",
                partial(self._list_page, kwargs),
            )
            for item in response.get("Contents", []):
                infos.append(
                    ObjectInfo(
                        name=item["Key"][len(root) :],
                        size=int(item["Size"]),
                        modified=item.get("LastModified"),
                        storage_class=item.get("StorageClass"),
                    )
                )
            if not response.get("IsTruncated"):
                return infos
            token = response.get("NextContinuationToken")

    def _list_page(self, kwargs: dict[str, Any]) -> Any:
        return self.client.list_objects_v2(**kwargs)

    def delete(self, name: str) -> None:
        self.call(
            f"delete {self.url(name)}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(name)),
        )


def parse_s3_url(location: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    if not location.startswith(S3_SCHEME):
        raise StorageError(f"{location!r} is not an s3:// location")
    bucket, _, key = location[len(S3_SCHEME) :].partition("/")
    if not bucket or not key:
        raise StorageError(
            f"{location!r} must name a bucket and an object",
            hint="use s3://BUCKET/PREFIX/TARGET/FILE (see `backup-pipelines list` for names)",
        )
    return bucket, key
