"""The storage contract, run against every backend: in memory, a local folder, and moto's S3
server over HTTP. A backend that passes this module behaves like the others, so code written
against ``BackupStorage`` (offsite copies, the WAL archive) may use any of them.

The memory and local cases need no server and run in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.storage import (
    BackupStorage,
    LocalStorage,
    MemoryStorage,
    ObjectNotFoundError,
    S3Storage,
    StorageError,
    default_s3_client,
)

MiB = 1 << 20
# The S3 case reaches its server through getfixturevalue, so it carries its tier marker itself.
BACKENDS = ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackupStorage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "local":
        yield LocalStorage(tmp_path / "store")
    else:
        request.getfixturevalue("aws_env")
        bucket = f"contract-{secrets.token_hex(4)}"
        default_s3_client().create_bucket(Bucket=bucket)
        # Parts of 5 MiB (S3's floor) so a 7 MiB file already takes the multipart path.
        yield S3Storage(bucket, "prefix/in", min_part_size=5 * MiB)


def _file(tmp_path: Path, size: int, name: str = "source.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("size", [0, 1, MiB + 3, 7 * MiB + 5])
def test_put_file_round_trip(store: BackupStorage, tmp_path: Path, size: int) -> None:
    source = _file(tmp_path, size)
    data = source.read_bytes()
    result = store.put_file(source, "prod/a.bin")
    assert (result.name, result.size) == ("prod/a.bin", size)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_bytes("prod/a.bin") == data
    chunks = list(store.iter_chunks("prod/a.bin", chunk_size=MiB))
    assert all(len(c) <= MiB for c in chunks) and b"".join(chunks) == data
    info = store.head("prod/a.bin")
    assert info is not None and info.name == "prod/a.bin" and info.size == size
    assert info.sha256 in (None, result.sha256)  # recorded by S3 and memory, not by a folder
    assert store.exists("prod/a.bin")
    assert source.read_bytes() == data  # put_file never consumes its source unless asked


def test_put_bytes_replaces_an_object_whole(store: BackupStorage) -> None:
    store.put_bytes("x/meta.json", b"first version, longer than the second")
    store.put_bytes("x/meta.json", b"second")
    assert store.read_bytes("x/meta.json") == b"second"
    info = store.head("x/meta.json")
    assert info is not None and info.size == len(b"second")
    assert [i.name for i in store.list("x/")] == ["x/meta.json"]


def test_missing_objects(store: BackupStorage) -> None:
    assert store.head("no/such.bin") is None
    assert not store.exists("no/such.bin")
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        store.read_bytes("no/such.bin")
    with pytest.raises(ObjectNotFoundError):
        next(iter(store.iter_chunks("no/such.bin")))
    store.delete("no/such.bin")  # deleting what is not there is fine


def test_list_is_sorted_filtered_by_prefix_and_sees_nested_names(store: BackupStorage) -> None:
    sizes = {"b/2.bin": 2, "a/1.bin": 1, "a/deeper/3.bin": 3, "ab.bin": 4, "c.bin": 5}
    for name, size in sizes.items():
        store.put_bytes(name, bytes(size))
    assert [i.name for i in store.list()] == sorted(sizes)
    assert [(i.name, i.size) for i in store.list("a/")] == [("a/1.bin", 1), ("a/deeper/3.bin", 3)]
    assert [i.name for i in store.list("a")] == ["a/1.bin", "a/deeper/3.bin", "ab.bin"]
    assert store.list("zzz/") == []
    assert all(i.modified is not None for i in store.list())


def test_delete_removes_only_that_object(store: BackupStorage) -> None:
    store.put_bytes("t/keep.bin", b"k")
    store.put_bytes("t/drop.bin", b"d")
    store.delete("t/drop.bin")
    assert store.head("t/drop.bin") is None
    assert [i.name for i in store.list("t/")] == ["t/keep.bin"]
    store.tidy()  # empty folders may go; objects stay
    assert store.read_bytes("t/keep.bin") == b"k"


def test_a_source_that_no_longer_matches_its_digest_is_not_stored(
    store: BackupStorage, tmp_path: Path
) -> None:
    for size in (10, 6 * MiB):  # one request, and multipart on S3
        source = _file(tmp_path, size)
        wrong = hashlib.sha256(b"what was recorded earlier").hexdigest()
        with pytest.raises(IntegrityError, match="no longer matches its recorded SHA-256"):
            store.put_file(source, f"v/{size}.bin", expected_sha256=wrong)
        assert store.head(f"v/{size}.bin") is None
        good = hashlib.sha256(source.read_bytes()).hexdigest()
        assert store.put_file(source, f"v/{size}.bin", expected_sha256=good).sha256 == good


@pytest.mark.parametrize("name", ["", "../escape", "/absolute", "a//b", "a/./b", "a/../../b"])
def test_names_are_plain_relative_keys(store: BackupStorage, name: str) -> None:
    with pytest.raises(StorageError):
        store.put_bytes(name, b"x")
    with pytest.raises(StorageError):
        store.read_bytes(name)


def test_progress_reports_every_byte_once(store: BackupStorage, tmp_path: Path) -> None:
    size = 6 * MiB + 7
    source = _file(tmp_path, size)
    sent: list[int] = []
    store.put_file(source, "p/big.bin", progress=sent.append)
    assert sum(sent) == size and all(n > 0 for n in sent)
    received: list[int] = []
    data = b"".join(store.iter_chunks("p/big.bin", progress=received.append))
    assert sum(received) == size == len(data)
    small: list[int] = []
    store.put_bytes("p/small.bin", b"12345", progress=small.append)
    assert sum(small) == 5
    read: list[int] = []
    assert store.read_bytes("p/small.bin", progress=read.append) == b"12345"
    assert sum(read) == 5


def test_move_hands_over_a_file_the_caller_wrote(store: BackupStorage, tmp_path: Path) -> None:
    """``move=True``: stored exactly; a folder store renames a spool on its own file system."""
    spool = store.spool_path("m/seg.zst") or tmp_path / "seg.zst.partial"
    payload = os.urandom(300_000)
    spool.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    result = store.put_file(spool, "m/seg.zst", expected_sha256=digest, move=True)
    assert result.sha256 == digest and result.size == len(payload)
    assert store.read_bytes("m/seg.zst") == payload
    if isinstance(store, LocalStorage):
        assert not spool.exists()  # renamed into place, not copied
        assert (store.root / "m/seg.zst").stat().st_mode & 0o777 == 0o600


def test_a_usable_store_is_writable(store: BackupStorage) -> None:
    store.check_writable()
    assert store.url("n/o.bin").endswith("n/o.bin")


@pytest.mark.parametrize("size", [0, MiB + 3, 17 * MiB + 5])
def test_get_file_downloads_atomically_and_checks_the_sha256(
    store: BackupStorage, tmp_path: Path, size: int
) -> None:
    """On S3, 17 MiB in 5 MiB ranges: four ranges fetched in parallel, written at their place."""
    source = _file(tmp_path, size)
    digest = store.put_file(source, "g/a.bin").sha256
    dest = tmp_path / "out" / "a.bin"
    dest.parent.mkdir()
    received: list[int] = []
    assert store.get_file("g/a.bin", dest, expected_sha256=digest, progress=received.append) == (
        digest
    )
    assert dest.read_bytes() == source.read_bytes()
    assert sum(received) == size
    assert dest.stat().st_mode & 0o777 == 0o600

    wrong = hashlib.sha256(b"what was recorded earlier").hexdigest()
    other = dest.with_name("b.bin")
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        store.get_file("g/a.bin", other, expected_sha256=wrong)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.bin"]  # nothing half-written
    with pytest.raises(ObjectNotFoundError):
        store.get_file("g/missing.bin", other)
    assert not other.exists()
