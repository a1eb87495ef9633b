"""Where backups are kept: one small interface, a local folder and S3 behind it.

Use it like this::

    from backup_pipelines.engine.storage import LocalStorage, S3Storage, open_backup

    artifact = open_backup("s3://bucket/prefix/prod/shop_20260101_020000.sql.gz")
    for chunk in artifact.stored_chunks():     # streamed from S3, 1 MiB at a time
        ...
    artifact = open_backup("/var/backups/prod/shop_20260101_020000.sql.gz")  # a local file

``open_backup`` returns a :class:`~backup_pipelines.engine.artifacts.BackupArtifact` for a local
path (``artifact.path`` is the real file) and a :class:`RemoteBackupArtifact` for ``s3://``
(``artifact.is_local`` is False and ``artifact.path`` is only the file *name*: code that needs a
real file, such as ``pg_restore -j`` on a bare custom archive, must decode into a temporary file
when ``not artifact.is_local``). Both stream with ``stored_chunks()`` and read the ``.sha256``
sidecar with ``recorded_sha256()``, so verify/restore code does not care where a backup lives.

A :class:`BackupStorage` holds objects by *name* (a relative, ``/``-separated key):

- ``put_file(path, name)`` streams a local file in (S3: multipart, part size grown so any file
  stays under 10,000 parts, ``ChecksumAlgorithm=SHA256``, storage class and server-side
  encryption as configured, retries with exponential backoff); ``put_bytes`` for small sidecars.
- ``iter_chunks(name)`` streams an object out; ``read_bytes(name)`` for small ones.
- ``head(name)`` (``None`` when absent), ``exists``, ``list(prefix)``, ``delete(name)``.

The S3 client comes from the caller (e.g. dagster-aws ``S3Resource.get_client()``) or is built
with boto3's defaults, which honour ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (so tests can
point it at a local moto server) and the usual ``AWS_*`` credentials.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from backup_pipelines.engine.artifacts import (
    META_SUFFIX,
    SHA256_SUFFIX,
    BackupArtifact,
    load_artifact,
    parse_meta,
    parse_sha256_text,
)
from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX, atomic_writer, ensure_private_dir

S3_SCHEME = "s3://"
MAX_PARTS = 10_000
MIN_PART_SIZE = 8 << 20  # S3's floor is 5 MiB; 8 MiB matches the AWS CLI default
MAX_PART_SIZE = 5 << 30  # S3's ceiling for one part
MAX_OBJECT_SIZE = 5 << 40
SHA256_METADATA_KEY = "sha256"  # x-amz-meta-sha256: the hex digest of the whole file
PART_SIZE_METADATA_KEY = "part-size"  # multipart part size, to recompute S3's checksum

T = TypeVar("T")


class StorageError(BackupPipelinesError):
    """Backup storage refused or failed an operation (the message names the object)."""

    def __init__(self, message: str, hint: str | None = None, *, code: str = "") -> None:
        super().__init__(message, hint)
        self.code = code  # S3's error code (NoSuchKey, AccessDenied, ...) when there is one


class StorageUnreachableError(StorageError):
    """The storage could not be reached after retries (network down, endpoint wrong, ...)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a storage knows about one stored object without reading it."""

    name: str
    size: int
    modified: datetime | None = None
    sha256: str | None = None  # hex digest of the whole object when recorded at upload
    checksum_sha256: str | None = None  # S3's own checksum (``<b64>-<parts>`` when multipart)
    storage_class: str | None = None
    server_side_encryption: str | None = None
    kms_key_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PutResult:
    """One completed upload: what was stored and the checksums computed while streaming it."""

    name: str
    url: str
    size: int
    sha256: str  # hex digest of the whole file, computed from the bytes we sent
    checksum_sha256: str | None  # S3-form checksum we expect (and the server confirmed)
    parts: int
    part_size: int
    storage_class: str | None = None
    server_side_encryption: str | None = None
    kms_key_id: str | None = None


def part_size_for(
    size: int, *, min_part_size: int = MIN_PART_SIZE, max_parts: int = MAX_PARTS
) -> int:
    """The smallest part size (a whole MiB, at least ``min_part_size``) that fits ``size`` in
    ``max_parts`` parts. A fixed part size would cap the object size (8 MiB x 10,000 = 78 GiB)."""
    if size > MAX_OBJECT_SIZE:
        raise StorageError(f"{size} bytes exceeds S3's 5 TiB object limit")
    needed = -(-size // max_parts)
    mib = 1 << 20
    needed = -(-needed // mib) * mib
    part = max(min_part_size, needed)
    if part > MAX_PART_SIZE:
        raise StorageError(f"{size} bytes cannot be uploaded in {max_parts} parts of at most 5 GiB")
    return part


def composite_checksum(part_digests: list[bytes]) -> str:
    """S3's checksum of a multipart upload: SHA-256 over the parts' raw digests, ``-<count>``."""
    joined = hashlib.sha256(b"".join(part_digests)).digest()
    return f"{base64.b64encode(joined).decode()}-{len(part_digests)}"


def single_checksum(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _require_digest(source: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{source} no longer matches its recorded SHA-256 ({actual[:16]}… instead of "
            f"{expected[:16]}…); it was not uploaded",
            hint="the local file was modified or damaged; verify it and use another backup",
        )


def expected_s3_checksum(path: Path, part_size: int | None) -> str:
    """The checksum S3 reports for ``path`` uploaded whole or in parts of ``part_size``."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        if not part_size or size <= part_size:
            digest = hashlib.sha256()
            for chunk in read_chunks(handle):
                digest.update(chunk)
            return single_checksum(digest.digest())
        digests = []
        while True:
            part = hashlib.sha256()
            left = part_size
            while left:
                chunk = handle.read(min(left, CHUNK_SIZE))
                if not chunk:
                    break
                part.update(chunk)
                left -= len(chunk)
            if left == part_size:
                break
            digests.append(part.digest())
        return composite_checksum(digests)


def checksums_match(expected: str | None, reported: str | None) -> bool:
    """Compare S3-form checksums; some servers omit the ``-<parts>`` suffix of composites."""
    if not expected or not reported:
        return False
    return expected.split("-", 1)[0] == reported.split("-", 1)[0]


class BackupStorage(ABC):
    """A place holding objects by relative name. Implementations: LocalStorage, S3Storage."""

    @abstractmethod
    def url(self, name: str = "") -> str:
        """A location string for ``name`` that ``open_backup`` understands."""

    @abstractmethod
    def put_file(
        self,
        source: Path,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_sha256: str | None = None,
    ) -> PutResult: ...

    @abstractmethod
    def put_bytes(
        self, name: str, data: bytes, *, metadata: dict[str, str] | None = None
    ) -> PutResult: ...

    @abstractmethod
    def iter_chunks(self, name: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    @abstractmethod
    def head(self, name: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    def read_bytes(self, name: str) -> bytes:
        return b"".join(self.iter_chunks(name))

    def exists(self, name: str) -> bool:
        return self.head(name) is not None


class LocalStorage(BackupStorage):
    """A local folder (0700, files 0600, every write atomic: temp name, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"object name {name!r} escapes {self.root}")
        return path

    def url(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def put_file(
        self,
        source: Path,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_sha256: str | None = None,
    ) -> PutResult:
        dest = self._path(name)
        ensure_private_dir(dest.parent, what="storage folder")
        digest = hashlib.sha256()
        size = 0
        with source.open("rb") as handle, atomic_writer(dest) as out:
            for chunk in read_chunks(handle):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            _require_digest(source, digest.hexdigest(), expected_sha256)
        return PutResult(name, self.url(name), size, digest.hexdigest(), None, 1, size)

    def put_bytes(
        self, name: str, data: bytes, *, metadata: dict[str, str] | None = None
    ) -> PutResult:
        dest = self._path(name)
        ensure_private_dir(dest.parent, what="storage folder")
        with atomic_writer(dest) as out:
            out.write(data)
        digest = hashlib.sha256(data).hexdigest()
        return PutResult(name, self.url(name), len(data), digest, None, 1, len(data))

    def iter_chunks(self, name: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            handle = self._path(name).open("rb")
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)} does not exist") from None
        with handle:
            yield from read_chunks(handle, chunk_size)

    def head(self, name: str) -> ObjectInfo | None:
        try:
            stat = self._path(name).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        infos = []
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(self.root).as_posix()
            if name.startswith(prefix):
                stat = path.stat()
                infos.append(
                    ObjectInfo(name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))
                )
        return infos

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or code in {
            "SlowDown",
            "RequestTimeout",
            "RequestTimeTooSkewed",
            "InternalError",
            "ServiceUnavailable",
            "Throttling",
            "ThrottlingException",
        }
    return False


_HINTS = {
    "NoSuchBucket": "create the bucket or fix S3_BACKUP_BUCKET / offsite.bucket",
    "AccessDenied": "the credentials lack permission (s3:PutObject, s3:GetObject, s3:ListBucket, "
    "s3:DeleteObject on the bucket)",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / the profile in use",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY / the profile in use",
}


def _is_stream_error(exc: BaseException) -> bool:
    """A connection that broke while a response body was being read."""
    from botocore.exceptions import ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(exc, ResponseStreamingError | ReadTimeoutError | Urllib3Error | OSError)


def _is_unreachable(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, BotoConnectionError | HTTPClientError)


def _setup_problem(exc: BaseException) -> tuple[str, str] | None:
    """What is wrong and what to do when boto3 fails before talking to S3 (no credentials, no
    region): these are configuration problems of this host, not S3 errors."""
    from botocore.exceptions import (
        CredentialRetrievalError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return (
            f"no usable AWS credentials on this host ({exc})",
            "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the "
            "host an instance role), e.g. in the environment file the service reads",
        )
    if isinstance(exc, NoRegionError):
        return ("no AWS region configured", "export AWS_DEFAULT_REGION (e.g. us-east-1)")
    return None


def _client_error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, StorageError):
        return exc.code
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def default_s3_client(max_attempts: int = 3) -> Any:
    """A boto3 S3 client from the environment (``AWS_*`` credentials, ``AWS_ENDPOINT_URL_S3``)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        config=Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
        ),
    )


class S3Storage(BackupStorage):
    """Objects under ``s3://bucket/prefix/``: streaming multipart uploads with SHA-256 checksums.

    ``storage_class`` (``STANDARD_IA``, ``GLACIER_IR``, ...) and ``server_side_encryption``
    (``AES256`` or ``aws:kms`` with ``kms_key_id``) apply to every upload. Transient errors
    (connection failures, 5xx, throttling) are retried ``attempts`` times per request with
    exponential backoff starting at ``backoff_seconds``; then :class:`StorageUnreachableError`.
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
        attempts: int = 3,
        backoff_seconds: float = 0.5,
        min_part_size: int = MIN_PART_SIZE,
        max_parts: int = MAX_PARTS,
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
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        self.min_part_size = min_part_size
        self.max_parts = max_parts
        self._sleep = sleep

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = default_s3_client()
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        key = self.key(name) if name else self.prefix
        return f"{S3_SCHEME}{self.bucket}/{key}" if key else f"{S3_SCHEME}{self.bucket}"

    def with_prefix(self, sub: str) -> S3Storage:
        """The same bucket and settings, one folder deeper."""
        clone = object.__new__(S3Storage)
        clone.__dict__.update(self.__dict__)
        clone.prefix = self.key(sub.strip("/"))
        return clone

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 request with retries; errors become StorageError naming ``what``."""
        delay = self.backoff_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc):
                    setup = _setup_problem(exc)
                    if setup is not None:
                        raise StorageError(
                            f"cannot {what}: {setup[0]}", hint=setup[1], code=type(exc).__name__
                        ) from None
                    code = _client_error_code(exc)
                    if not code:
                        raise
                    raise StorageError(
                        f"S3 refused to {what}: {exc}",
                        hint=_HINTS.get(code, "check the bucket name, region and credentials"),
                        code=code,
                    ) from None
                if attempt == self.attempts:
                    endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", "?")
                    if _is_unreachable(exc):
                        raise StorageUnreachableError(
                            f"S3 unreachable while trying to {what} ({endpoint}) after "
                            f"{self.attempts} attempts: {exc}",
                            hint="check the network, AWS_ENDPOINT_URL_S3 and the bucket's region; "
                            "the local backup is kept and the next run uploads what is missing",
                        ) from None
                    raise StorageError(
                        f"S3 kept failing to {what} ({endpoint}) after {self.attempts} attempts: {exc}",
                        hint="S3 reported a server-side or throttling error; retry later",
                    ) from None
                self._sleep(delay * (1 + random.random() / 4))
                delay *= 2
        raise AssertionError("unreachable")

    def _extra_args(self, metadata: dict[str, str] | None) -> dict[str, Any]:
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

    def _result(
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

    def put_bytes(
        self, name: str, data: bytes, *, metadata: dict[str, str] | None = None
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
                **self._extra_args(meta),
            ),
        )
        self._confirm(name, checksum, response.get("ChecksumSHA256"))
        return self._result(name, len(data), digest.hexdigest(), checksum, 1, len(data))

    def _confirm(self, name: str, expected: str, reported: str | None) -> None:
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

    def put_file(
        self,
        source: Path,
        name: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_sha256: str | None = None,
    ) -> PutResult:
        """Stream ``source`` to S3. Only one part is held in memory at a time."""
        size = source.stat().st_size
        part_size = part_size_for(size, min_part_size=self.min_part_size, max_parts=self.max_parts)
        if size <= part_size:
            # Small enough for one request; the object still gets a SHA-256 checksum.
            data = source.read_bytes()
            _require_digest(source, hashlib.sha256(data).hexdigest(), expected_sha256)
            return self.put_bytes(name, data, metadata=metadata)
        key = self.key(name)
        whole = hashlib.sha256()
        with source.open("rb") as handle:
            # First pass: the whole-file digest goes into the object's metadata at creation.
            for chunk in read_chunks(handle):
                whole.update(chunk)
            sha256_hex = whole.hexdigest()
            _require_digest(source, sha256_hex, expected_sha256)
            meta = {
                SHA256_METADATA_KEY: sha256_hex,
                PART_SIZE_METADATA_KEY: str(part_size),
                **(metadata or {}),
            }
            created = self.call(
                f"start the upload of {self.url(name)}",
                lambda: self.client.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    ChecksumAlgorithm="SHA256",
                    **self._extra_args(meta),
                ),
            )
            upload_id = created["UploadId"]
            parts: list[dict[str, Any]] = []
            digests: list[bytes] = []
            try:
                handle.seek(0)
                second = hashlib.sha256()
                number = 0
                while True:
                    data = handle.read(part_size)
                    if not data:
                        break
                    number += 1
                    second.update(data)
                    part_digest = hashlib.sha256(data).digest()
                    part_checksum = single_checksum(part_digest)
                    response = self.call(
                        f"upload part {number} of {self.url(name)}",
                        lambda data=data, number=number, part_checksum=part_checksum: (
                            self.client.upload_part(
                                Bucket=self.bucket,
                                Key=key,
                                UploadId=upload_id,
                                PartNumber=number,
                                Body=data,
                                ChecksumAlgorithm="SHA256",
                                ChecksumSHA256=part_checksum,
                            )
                        ),
                    )
                    parts.append(
                        {
                            "PartNumber": number,
                            "ETag": response["ETag"],
                            "ChecksumSHA256": part_checksum,
                        }
                    )
                    digests.append(part_digest)
                    del data
                if second.hexdigest() != sha256_hex:
                    raise IntegrityError(
                        f"{source} changed while it was being uploaded",
                        hint="a backup file must not be modified; check what else writes there",
                    )
                completed = self.call(
                    f"complete the upload of {self.url(name)}",
                    lambda: self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                )
            except BaseException:
                # Leave no half upload billed forever (a lifecycle rule also cleans these up).
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                raise
        checksum = composite_checksum(digests)
        self._confirm(name, checksum, completed.get("ChecksumSHA256"))
        return self._result(name, size, sha256_hex, checksum, len(parts), part_size)

    def iter_chunks(self, name: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream an object; a dropped connection resumes where it stopped (Range request)."""
        response = self._get(name)
        etag = response.get("ETag")
        offset = 0
        failures = 0
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = body.read(chunk_size)
                except Exception as exc:
                    if not _is_transient(exc) and not _is_stream_error(exc):
                        raise
                    failures += 1
                    if failures >= self.attempts:
                        raise StorageUnreachableError(
                            f"download of {self.url(name)} kept failing after {offset} bytes: {exc}",
                            hint="check the network and retry",
                        ) from None
                    body.close()
                    self._sleep(self.backoff_seconds * failures)
                    # If-Match: never splice bytes of a replaced object onto the old ones.
                    body = self._get(name, offset=offset, if_match=etag)["Body"]
                    continue
                if not chunk:
                    return
                offset += len(chunk)
                yield chunk
        finally:
            body.close()

    def _get(self, name: str, *, offset: int = 0, if_match: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if offset:
            extra["Range"] = f"bytes={offset}-"
        if if_match:
            extra["IfMatch"] = if_match
        try:
            return self.call(
                f"download {self.url(name)}",
                lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra),
            )
        except Exception as exc:
            if _client_error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
                raise StorageError(f"{self.url(name)} does not exist") from None
            if _client_error_code(exc) == "PreconditionFailed":
                raise StorageError(
                    f"{self.url(name)} was replaced while it was being read",
                    hint="retry; if it keeps changing, something else writes to this location",
                    code="PreconditionFailed",
                ) from None
            if _client_error_code(exc) == "InvalidObjectState":
                raise StorageError(
                    f"{self.url(name)} is archived (Glacier / Deep Archive) and cannot be read yet",
                    hint="restore it first: aws s3api restore-object --bucket ... --key ... "
                    "--restore-request Days=3, then retry once it is available",
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
        except Exception as exc:
            if _client_error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
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
                lambda kwargs=kwargs: self.client.list_objects_v2(**kwargs),
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


@dataclass(frozen=True)
class RemoteBackupArtifact(BackupArtifact):
    """A backup held by a :class:`BackupStorage` (e.g. S3): streamed, never a local file.

    ``path`` is only ``Path(file name)`` (for messages); use ``location`` for the full URL.
    """

    storage: BackupStorage | None = None
    name: str = ""

    @property
    def is_local(self) -> bool:
        return False

    @property
    def damage(self) -> str | None:  # type: ignore[override]
        # The cheap local checks would cost S3 requests per backup; checksum checks cover copies.
        return None

    @property
    def location(self) -> str:
        assert self.storage is not None
        return self.storage.url(self.name)

    @property
    def sidecar_names(self) -> list[str]:
        return [self.name + SHA256_SUFFIX, self.name + META_SUFFIX]

    def open_stored(self) -> BinaryIO:
        raise StorageError(
            f"{self.location} is remote: stream it with stored_chunks() instead of opening it"
        )

    def stored_chunks(self) -> Iterator[bytes]:
        assert self.storage is not None
        yield from self.storage.iter_chunks(self.name)

    def recorded_sha256(self) -> str:
        assert self.storage is not None
        try:
            text = self.storage.read_bytes(self.name + SHA256_SUFFIX).decode("utf-8", "replace")
        except StorageError:
            raise IntegrityError(
                f"checksum file missing: {self.location}{SHA256_SUFFIX}",
                hint="the offsite copy is incomplete; do not trust it",
            ) from None
        return parse_sha256_text(text, self.location + SHA256_SUFFIX)

    def record_check(self, name: str, passed: bool, message: str) -> BackupArtifact:
        """Record a verification outcome in the remote ``.meta`` (rewritten whole)."""
        assert self.storage is not None
        verification = dict(self.meta.verification or {})
        checks = dict(verification.get("checks") or {})
        checked_at = datetime.now(UTC).isoformat()
        checks[name] = {"passed": passed, "message": message, "checked_at": checked_at}
        verification.update(
            checks=checks, passed=all(c["passed"] for c in checks.values()), checked_at=checked_at
        )
        meta = self.meta.model_copy(update={"verification": verification})
        self.storage.put_bytes(
            self.name + META_SUFFIX, (meta.model_dump_json(indent=2) + "\n").encode()
        )
        return RemoteBackupArtifact(self.path, meta, self.storage, self.name)


def load_remote_artifact(storage: BackupStorage, name: str) -> RemoteBackupArtifact:
    """The backup ``name`` in ``storage`` (its ``.meta`` is read now; data is streamed later)."""
    for suffix in (META_SUFFIX, SHA256_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(PARTIAL_SUFFIX):
        raise IntegrityError(f"{storage.url(name)} is the leftover of an interrupted backup")
    if storage.head(name) is None:
        raise IntegrityError(
            f"backup not found: {storage.url(name)}",
            hint="list the offsite copies with `backup-pipelines prune <target> --dry-run`",
        )
    try:
        raw = storage.read_bytes(name + META_SUFFIX)
    except StorageError:
        raise IntegrityError(
            f"metadata file missing: {storage.url(name)}{META_SUFFIX}",
            hint="the offsite copy is incomplete or its sidecar was deleted; do not trust it",
        ) from None
    meta = parse_meta(raw, storage.url(name) + META_SUFFIX)
    return RemoteBackupArtifact(Path(name.rsplit("/", 1)[-1]), meta, storage, name)


def list_stored_backups(storage: BackupStorage, prefix: str = "") -> list[BackupArtifact]:
    """Complete backups in ``storage`` (data object + ``.meta``), newest first by recorded time."""
    # Only this folder, like list_artifacts locally: sub-folders (e.g. base/) hold other kinds.
    names = {info.name for info in storage.list(prefix) if "/" not in info.name[len(prefix) :]}
    artifacts: list[BackupArtifact] = []
    for name in names:
        if not name.endswith(META_SUFFIX):
            continue
        data = name[: -len(META_SUFFIX)]
        if data not in names or data.endswith(PARTIAL_SUFFIX):
            continue
        if isinstance(storage, LocalStorage):
            with contextlib.suppress(IntegrityError):
                artifacts.append(load_artifact(storage.root / data))
            continue
        with contextlib.suppress(IntegrityError):
            artifacts.append(load_remote_artifact(storage, data))
    artifacts.sort(key=lambda a: a.meta.started_at, reverse=True)
    return artifacts


def open_backup(location: str | os.PathLike[str], *, s3_client: Any = None) -> BackupArtifact:
    """Open a backup by location: a local path (of the file or its sidecar) or ``s3://bucket/key``."""
    text = os.fspath(location)
    if text.startswith(S3_SCHEME):
        bucket, key = parse_s3_url(text)
        return load_remote_artifact(S3Storage(bucket, client=s3_client), key)
    return load_artifact(text)
