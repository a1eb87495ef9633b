"""What is particular to each backend, against a real local folder and moto's S3 server over
HTTP (what they share is ``test_storage_contract.py``; retries are ``test_storage_retry.py``)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest

from backup_pipelines.engine.artifacts import load_artifact
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.storage import (
    MAX_PARTS,
    MIN_PART_SIZE,
    LocalStorage,
    RemoteBackupArtifact,
    S3Storage,
    StorageError,
    default_s3_client,
    list_stored_backups,
    open_backup,
    part_size_for,
)

MiB = 1 << 20


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"bp-test-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=name)
    return name


def test_part_size_grows_so_any_size_fits_in_10000_parts() -> None:
    assert part_size_for(1) == MIN_PART_SIZE
    assert part_size_for(MIN_PART_SIZE * MAX_PARTS) == MIN_PART_SIZE
    one_tib = 1 << 40
    size = part_size_for(one_tib)
    assert size % MiB == 0 and -(-one_tib // size) <= MAX_PARTS
    five_tib = 5 << 40
    assert -(-five_tib // part_size_for(five_tib)) <= MAX_PARTS
    with pytest.raises(StorageError):
        part_size_for((5 << 40) + 1)


def test_local_storage_round_trip(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 * MiB + 5))
    result = store.put_file(source, "prod/a.bin")
    assert result.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.read_bytes("prod/a.bin") == source.read_bytes()
    assert (store.root / "prod/a.bin").stat().st_mode & 0o777 == 0o600
    assert [i.name for i in store.list("prod/")] == ["prod/a.bin"]
    store.delete("prod/a.bin")
    assert store.head("prod/a.bin") is None
    with pytest.raises(StorageError):
        store.put_bytes("../escape", b"x")


def test_a_folder_that_must_exist_is_never_created(tmp_path: Path) -> None:
    """An archive volume that is not mounted must fail loudly, not fill the disk underneath."""
    root = tmp_path / "mnt" / "archive"
    store = LocalStorage(root, what="archive folder", create_root=False)
    with pytest.raises(
        StorageError, match=r"archive folder .* does not exist \(or is not mounted\)"
    ):
        store.check_writable()
    with pytest.raises(StorageError) as caught:
        store.put_bytes("a/b.bin", b"x")
    assert caught.value.code == "NoSuchFolder"
    with pytest.raises(StorageError):
        store.spool_path("a/b.bin")
    assert not root.exists() and not root.parent.exists()
    root.mkdir(parents=True, mode=0o700)
    store.put_bytes("a/b.bin", b"x")
    assert (root / "a").stat().st_mode & 0o777 == 0o700
    assert (root / "a/b.bin").stat().st_mode & 0o777 == 0o600


def test_a_symlink_inside_the_root_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    store = LocalStorage(tmp_path / "store")
    store.root.mkdir()
    (store.root / "link").symlink_to(outside)
    with pytest.raises(StorageError, match="escapes"):
        store.read_bytes("link/secret")
    with pytest.raises(StorageError, match="escapes"):
        store.put_bytes("link/new", b"x")
    assert not (outside / "new").exists()


def test_tidy_removes_empty_folders_but_never_the_root(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    store.put_bytes("0000000100000000/a.zst", b"a")
    store.put_bytes("0000000100000001/b.zst", b"b")
    store.delete("0000000100000000/a.zst")
    store.tidy()
    assert sorted(p.name for p in store.root.iterdir()) == ["0000000100000001"]
    store.delete("0000000100000001/b.zst")
    store.tidy()
    assert store.root.is_dir() and list(store.root.iterdir()) == []


def test_s3_multipart_with_small_part_ceiling_records_checksum_sse_and_class(
    bucket: str, tmp_path: Path
) -> None:
    store = S3Storage(
        bucket,
        "offsite",
        storage_class="STANDARD_IA",
        server_side_encryption="AES256",
        min_part_size=5 * MiB,
        max_parts=2,
    )
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * MiB))
    result = store.put_file(source, "prod/big.bin")
    # 12 MiB in at most 2 parts: the part size grew from 5 MiB to 6 MiB.
    assert (result.parts, result.part_size) == (2, 6 * MiB)
    info = store.head("prod/big.bin")
    assert info is not None
    assert info.size == 12 * MiB
    assert info.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (
        info.checksum_sha256
        and info.checksum_sha256.split("-")[0] == result.checksum_sha256.split("-")[0]
    )
    assert info.storage_class == "STANDARD_IA"
    assert info.server_side_encryption == "AES256"
    streamed = hashlib.sha256()
    for chunk in store.iter_chunks("prod/big.bin"):
        assert len(chunk) <= MiB
        streamed.update(chunk)
    assert streamed.hexdigest() == result.sha256


def test_open_backup_streams_a_remote_artifact(bucket: str, tmp_path: Path) -> None:
    from backup_pipelines_tests.engine.storage_helpers import fake_backup

    local = fake_backup(tmp_path / "prod", "shop", payload=os.urandom(2 * MiB))
    store = S3Storage(bucket, "pre")
    for path in (local.path, *local.sidecars):
        store.put_file(path, f"prod/{path.name}")
    remote = open_backup(f"s3://{bucket}/pre/prod/{local.path.name}")
    assert isinstance(remote, RemoteBackupArtifact) and not remote.is_local
    assert remote.meta.sha256 == local.meta.sha256
    assert remote.recorded_sha256() == local.meta.sha256
    assert b"".join(remote.stored_chunks()) == local.path.read_bytes()
    assert remote.location == f"s3://{bucket}/pre/prod/{local.path.name}"
    listed = list_stored_backups(store, "prod/")
    assert [a.meta.sha256 for a in listed] == [local.meta.sha256]
    assert open_backup(local.path).is_local
    assert load_artifact(local.path).location == str(local.path)
    with pytest.raises(IntegrityError, match="not found"):
        open_backup(f"s3://{bucket}/pre/prod/missing.sql.gz")


def test_download_resumes_after_a_broken_connection(bucket: str) -> None:
    """Fault injection on a real HTTP response: the body breaks after the first chunk."""
    from botocore.exceptions import ResponseStreamingError

    client = default_s3_client()
    store = S3Storage(bucket, client=client, backoff_seconds=0.01)
    payload = os.urandom(3 * MiB + 17)
    store.put_bytes("obj", payload)
    calls = []

    class BreaksOnce:
        def __init__(self, body) -> None:
            self.body = body

        def read(self, size: int) -> bytes:
            if len(calls) == 1 and getattr(self, "done", False):
                raise ResponseStreamingError(error="connection reset by peer (injected)")
            self.done = True
            return self.body.read(size)

        def close(self) -> None:
            self.body.close()

    def wrap(http_response, parsed, **kwargs) -> None:
        if "Body" in parsed:
            calls.append(http_response.status_code)
            parsed["Body"] = BreaksOnce(parsed["Body"])

    client.meta.events.register("after-call.s3.GetObject", wrap)
    assert b"".join(store.iter_chunks("obj")) == payload
    assert len(calls) == 2  # the first request and one resumed Range request

    # An object replaced between the break and the resume is not spliced together.
    calls.clear()
    chunks = store.iter_chunks("obj")
    first = next(chunks)
    store.put_bytes("obj", os.urandom(len(payload)))
    with pytest.raises(StorageError, match="replaced while it was being read"):
        b"".join([first, *chunks])
