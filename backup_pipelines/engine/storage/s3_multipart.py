"""S3 multipart uploads: part sizing within S3's limits, and S3's own SHA-256 checksum forms
(whole-object ``<b64>``, composite ``<b64>-<parts>``) so a copy can be checked against S3."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.storage.base import Progress, PutResult, StorageError, require_digest

if TYPE_CHECKING:
    from backup_pipelines.engine.storage.s3 import S3Storage

MAX_PARTS = 10_000
MIN_PART_SIZE = 8 << 20  # S3's floor is 5 MiB; 8 MiB matches the AWS CLI default
MAX_PART_SIZE = 5 << 30  # S3's ceiling for one part
MAX_OBJECT_SIZE = 5 << 40
SHA256_METADATA_KEY = "sha256"  # x-amz-meta-sha256: the hex digest of the whole file
PART_SIZE_METADATA_KEY = "part-size"  # multipart part size, to recompute S3's checksum
# Parts sent (or fetched) at once. Each one in flight holds a part in memory (8 MiB for files up
# to 78 GiB), so 6 parts cost about 56 MiB with the one being read, and keep a link with tens of
# milliseconds of latency busy; ``offsite.concurrency`` in the targets file changes it.
DEFAULT_CONCURRENCY = 6
MAX_CONCURRENCY = 32
# Whatever the concurrency, parts in flight never hold more than this (parts grow past 8 MiB
# only for files over 78 GiB: a 1 TiB file has 105 MiB parts, so 4 of them fly at once).
TRANSFER_MEMORY_BUDGET = 512 << 20


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


def transfer_slots(concurrency: int, part_size: int) -> int:
    """How many parts may be in flight at once: ``concurrency``, lowered so the parts held in
    memory stay under :data:`TRANSFER_MEMORY_BUDGET` when huge files need huge parts."""
    return max(1, min(concurrency, TRANSFER_MEMORY_BUDGET // max(1, part_size)))


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
    """Stream ``source`` to S3 in parts of ``part_size``, up to ``storage.concurrency`` parts
    in flight at once (memory: that many parts plus the one being read).

    The file is read once: each part is hashed (its SHA-256 goes with it, S3 checks it on
    arrival) and fed to the whole-file digest while earlier parts are still being sent. The
    whole-file digest goes into the object's metadata when the upload starts, so it must be
    known then: callers pass ``expected_sha256`` (the backup's record); without one the file is
    hashed first. The upload is completed (the object appears) only when the digest of the bytes
    sent equals it; otherwise it is aborted and nothing is published."""
    key = storage.key(name)
    if expected_sha256 is None:
        expected_sha256 = file_sha256(source)
    meta = {
        SHA256_METADATA_KEY: expected_sha256,
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
    whole = hashlib.sha256()
    sent = 0
    slots = transfer_slots(storage.concurrency, part_size)
    pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="s3-upload")
    in_flight: deque[tuple[int, str, int, Future[Any]]] = deque()

    def settle_oldest() -> None:
        nonlocal sent
        number, checksum, length, future = in_flight.popleft()
        response = future.result()
        parts.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum})
        sent += length
        if progress is not None:
            progress(length)

    try:
        with source.open("rb") as handle:
            number = 0
            while True:
                if len(in_flight) >= slots:
                    settle_oldest()
                data = handle.read(part_size)
                if not data:
                    break
                number += 1
                whole.update(data)
                part_digest = hashlib.sha256(data).digest()
                digests.append(part_digest)
                checksum = single_checksum(part_digest)
                send = partial(_upload_part, storage, key, upload_id, number, data, checksum)
                what = f"upload part {number} of {storage.url(name)}"
                future = pool.submit(storage.call, what, send)
                in_flight.append((number, checksum, len(data), future))
                del data
        while in_flight:
            settle_oldest()
        require_digest(source, whole.hexdigest(), expected_sha256)
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
        # Stop sending, then leave no half upload billed forever (a lifecycle rule also
        # cleans these up).
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            storage.client.abort_multipart_upload(
                Bucket=storage.bucket, Key=key, UploadId=upload_id
            )
        raise
    finally:
        pool.shutdown(wait=True)
    checksum = composite_checksum(digests)
    storage.confirm(name, checksum, completed.get("ChecksumSHA256"))
    return storage.result(name, sent, expected_sha256, checksum, len(parts), part_size)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in read_chunks(handle):
            digest.update(chunk)
    return digest.hexdigest()


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
