"""The one S3 retry policy, counted on the wire: a real HTTP server in front of moto fails
requests on purpose and records every try (``failing_s3_proxy.py``).

Before: the engine's 3-attempt loop wrapped botocore's own attempts, so one failing request
was tried up to 12 times. Now botocore alone retries a request (S3_MAX_ATTEMPTS tries in all);
the engine only resumes a download whose body broke, which botocore cannot do.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from backup_pipelines.engine.storage import (
    S3_MAX_ATTEMPTS,
    S3_RETRIES,
    S3Storage,
    StorageError,
    StorageUnreachableError,
    default_s3_client,
)
from backup_pipelines.engine.storage.retry import DOWNLOAD_RESUMES
from backup_pipelines_tests.failing_s3_proxy import FailingS3Proxy, Seen

MiB = 1 << 20


@pytest.fixture
def proxy(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FailingS3Proxy]:
    server = FailingS3Proxy(aws_env).start()
    # Every client built from the environment now talks to S3 through the failing proxy.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    yield server
    server.stop()


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"retry-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket=name)
    return name


def _direct(aws_env: str):  # type: ignore[no-untyped-def]
    """A client straight to moto (no proxy), to check what really got stored."""
    return boto3.client("s3", endpoint_url=aws_env)


def _object(bucket: str, key: str, method: str = "PUT"):  # type: ignore[no-untyped-def]
    return lambda s: s.method == method and s.key(bucket) == key


def test_a_request_that_keeps_failing_is_tried_exactly_s3_max_attempts_times(
    proxy: FailingS3Proxy, bucket: str, aws_env: str
) -> None:
    storage = S3Storage(bucket, "p", client=default_s3_client())
    is_put = _object(bucket, "p/sidecar.sha256")
    proxy.fail(is_put, times=100, action="503")
    with pytest.raises(StorageError, match=f"kept failing .* after {S3_MAX_ATTEMPTS} attempts"):
        storage.put_bytes("sidecar.sha256", b"abc  file\n")
    assert proxy.count(is_put) == S3_MAX_ATTEMPTS  # not 3 x 4 = 12 as before
    assert "Contents" not in _direct(aws_env).list_objects_v2(Bucket=bucket)


def test_a_short_outage_is_absorbed_by_botocore_alone(
    proxy: FailingS3Proxy, bucket: str, aws_env: str
) -> None:
    storage = S3Storage(bucket, client=default_s3_client())
    is_put = _object(bucket, "meta.json")
    proxy.fail(is_put, times=S3_MAX_ATTEMPTS - 1, action="500")
    storage.put_bytes("meta.json", b'{"ok": true}')
    assert proxy.count(is_put) == S3_MAX_ATTEMPTS
    body = _direct(aws_env).get_object(Bucket=bucket, Key="meta.json")["Body"].read()
    assert body == b'{"ok": true}'


def test_dropped_connections_end_as_unreachable_after_the_same_count(
    proxy: FailingS3Proxy, bucket: str
) -> None:
    storage = S3Storage(bucket, client=default_s3_client())
    is_head = _object(bucket, "x.sql.gz", "HEAD")
    proxy.fail(is_head, times=100, action="drop")
    with pytest.raises(StorageUnreachableError, match=f"after {S3_MAX_ATTEMPTS} attempts") as e:
        storage.head("x.sql.gz")
    assert "next run uploads what is missing" in (e.value.hint or "")
    assert proxy.count(is_head) == S3_MAX_ATTEMPTS


def test_a_refusal_is_not_retried(proxy: FailingS3Proxy, bucket: str) -> None:
    storage = S3Storage(bucket, client=default_s3_client())
    is_get = _object(bucket, "missing.bin", "GET")
    assert storage.head("missing.bin") is None
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes("missing.bin")
    assert proxy.count(is_get) == 1
    assert proxy.count(_object(bucket, "missing.bin", "HEAD")) == 1


def test_a_failing_part_is_resent_by_botocore_and_the_upload_completes(
    proxy: FailingS3Proxy, bucket: str, aws_env: str, tmp_path: Path
) -> None:
    storage = S3Storage(bucket, client=default_s3_client(), min_part_size=5 * MiB)
    source = tmp_path / "backup.bin"
    source.write_bytes(os.urandom(11 * MiB))

    def part_two(s: Seen) -> bool:
        return s.method == "PUT" and s.query.get("partNumber") == ["2"]

    proxy.fail(part_two, times=2, action="503")
    result = storage.put_file(source, "big.bin")
    assert result.parts == 3
    assert proxy.count(part_two) == 3  # two failures, then the same bytes again
    stored = _direct(aws_env).get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_body_cut_mid_download_is_resumed_by_the_engine_only(
    proxy: FailingS3Proxy, bucket: str, aws_env: str
) -> None:
    payload = os.urandom(3 * MiB + 11)
    _direct(aws_env).put_object(Bucket=bucket, Key="dump.sql.zst", Body=payload)
    storage = S3Storage(bucket, client=default_s3_client(), backoff_seconds=0.01)
    is_get = _object(bucket, "dump.sql.zst", "GET")
    proxy.fail(is_get, times=1, action="cut")
    assert b"".join(storage.iter_chunks("dump.sql.zst")) == payload
    gets = [s for s in proxy.seen if is_get(s)]
    assert len(gets) == 2
    assert gets[1].headers.get("range", "").startswith("bytes=") and "if-match" in gets[1].headers

    proxy.reset()
    proxy.fail(is_get, times=100, action="cut")
    with pytest.raises(StorageUnreachableError, match="kept failing after"):
        b"".join(storage.iter_chunks("dump.sql.zst"))
    assert proxy.count(is_get) == 1 + DOWNLOAD_RESUMES


def test_the_dagster_resource_follows_the_same_policy(
    proxy: FailingS3Proxy, bucket: str, make_project
) -> None:  # type: ignore[no-untyped-def]
    """Dagster runs get their S3 client from the offsite_s3 resource: it must try a request
    as often as the engine's own client, neither more nor less."""
    from backup_pipelines.definitions import defs
    from backup_pipelines.lib.names import OFFSITE_S3

    make_project({"prod": {"dsn_env": "UNUSED", "offsite": {"bucket": bucket}}})
    resources = defs().resources
    assert resources is not None
    resource = resources[OFFSITE_S3]
    assert resource.max_attempts == S3_RETRIES
    storage = S3Storage(bucket, client=resource.get_client())
    is_put = _object(bucket, "from-dagster.bin")
    proxy.fail(is_put, times=100, action="503")
    with pytest.raises(StorageError, match="kept failing"):
        storage.put_bytes("from-dagster.bin", b"x")
    assert proxy.count(is_put) == S3_MAX_ATTEMPTS


def test_parallel_ranges_resume_a_cut_body_and_never_splice_a_replaced_object(
    proxy: FailingS3Proxy, bucket: str, aws_env: str, tmp_path: Path
) -> None:
    payload = os.urandom(16 * MiB + 3)
    _direct(aws_env).put_object(Bucket=bucket, Key="dump.bin", Body=payload)
    storage = S3Storage(
        bucket, client=default_s3_client(), min_part_size=5 * MiB, backoff_seconds=0.01
    )

    def range_two(s: Seen) -> bool:
        return s.method == "GET" and s.headers.get("range", "").startswith(f"bytes={5 * MiB}-")

    proxy.fail(range_two, times=1, action="cut")
    dest = tmp_path / "dump.bin"
    digest = hashlib.sha256(payload).hexdigest()
    assert storage.get_file("dump.bin", dest, expected_sha256=digest) == digest
    assert dest.read_bytes() == payload
    gets = [s for s in proxy.seen if s.method == "GET" and s.key(bucket) == "dump.bin"]
    assert len(gets) == 4 + 1  # four ranges, one of them resumed once
    assert all("if-match" in s.headers for s in gets)  # every range pins the same object

    # The object is replaced between the HEAD and the ranges: S3 refuses (If-Match), nothing
    # is spliced and nothing is left behind.
    proxy.reset()
    info = storage.head("dump.bin")
    assert info is not None
    _direct(aws_env).put_object(Bucket=bucket, Key="dump.bin", Body=os.urandom(16 * MiB))
    storage.head = lambda name: info  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="replaced while it was being read"):
        storage.get_file("dump.bin", tmp_path / "again.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.bin"]
