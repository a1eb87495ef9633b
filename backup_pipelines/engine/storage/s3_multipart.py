"""S3 multipart uploads: part sizing within S3's limits, and S3's own SHA-256 checksum forms
(whole-object ``<b64>``, composite ``<b64>-<parts>``) so a copy can be checked against S3."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.storage.base import Progress, PutResult, StorageError, require_digest

if TYPE_CHECKING:
    from backup_pipelines.engine.storage.s3 import S3Storage

MAX_PARTS = 10_000
MIN_PART_SIZE = 8 << 20  # S3's floor is 5 MiB; 8 MiB matches the AWS CLI default
MAX_PART_SIZE = 5 << 30  # S3's ceiling for one part
MAX_OBJECT_SIZE = 5 << 40
SHA256_METADATA_KEY = "sha256"  # x-amz-meta-sha256: the hex digest of the whole file
PART_SIZE_METADATA_KEY = "part-size"  # multipart part size, to recompute S3's checksum


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


def put_multipart(
    storage: S3Storage,
    source: Path,
    name: str,
    *,
    part_size: int,
    metadata: dict[str, str] | None,
    expected_sha256: str | None,
    progress: Progress | None,
) -> PutResult:
    """Stream ``source`` to S3 in parts of ``part_size``, one part in memory at a time. The
    whole-file digest is computed first (it goes into the object's metadata at creation) and
    again while sending: a file that changes meanwhile is refused."""
    key = storage.key(name)
    whole = hashlib.sha256()
    with source.open("rb") as handle:
        for chunk in read_chunks(handle):
            whole.update(chunk)
        sha256_hex = whole.hexdigest()
        require_digest(source, sha256_hex, expected_sha256)
        meta = {
            SHA256_METADATA_KEY: sha256_hex,
            PART_SIZE_METADATA_KEY: str(part_size),
            **(metadata or {}),
        }
        created = storage.call(
            f"start the upload of {storage.url(name)}",
            lambda: storage.client.create_multipart_upload(
                Bucket=storage.bucket,
                Key=key,
                ChecksumAlgorithm="SHA256",
                **storage.extra_args(meta),
            ),
        )
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        digests: list[bytes] = []
        try:
            handle.seek(0)
            second = hashlib.sha256()
            number = sent = 0
            while True:
                data = handle.read(part_size)
                if not data:
                    break
                number += 1
                second.update(data)
                part_digest = hashlib.sha256(data).digest()
                part_checksum = single_checksum(part_digest)
                response = storage.call(
                    f"upload part {number} of {storage.url(name)}",
                    partial(_upload_part, storage, key, upload_id, number, data, part_checksum),
                )
                parts.append(
                    {
                        "PartNumber": number,
                        "ETag": response["ETag"],
                        "ChecksumSHA256": part_checksum,
                    }
                )
                digests.append(part_digest)
                sent += len(data)
                if progress is not None:
                    progress(len(data))
                del data
            if second.hexdigest() != sha256_hex:
                raise IntegrityError(
                    f"{source} changed while it was being uploaded",
                    hint="a backup file must not be modified; check what else writes there",
                )
            completed = storage.call(
                f"complete the upload of {storage.url(name)}",
                lambda: storage.client.complete_multipart_upload(
                    Bucket=storage.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            # Leave no half upload billed forever (a lifecycle rule also cleans these up).
            with contextlib.suppress(Exception):
                storage.client.abort_multipart_upload(
                    Bucket=storage.bucket, Key=key, UploadId=upload_id
                )
            raise
    checksum = composite_checksum(digests)
    storage.confirm(name, checksum, completed.get("ChecksumSHA256"))
    return storage.result(name, sent, sha256_hex, checksum, len(parts), part_size)


def _upload_part(
    storage: S3Storage, key: str, upload_id: str, number: int, data: bytes, checksum: str
) -> Any:
    return storage.client.upload_part(
        Bucket=storage.bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=number,
        Body=data,
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=checksum,
    )
