"""The wal-push / wal-fetch contract on every kind of place the archive can use: in memory, a
local folder, moto's S3 server. The WAL archive is a thin layer over the storage interface, so
the same rules must hold on each (``test_wal.py`` checks the exit statuses PostgreSQL sees).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_pipelines.engine.config import PitrSettings
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.storage import (
    BackupStorage,
    LocalStorage,
    MemoryStorage,
    S3Storage,
    default_s3_client,
)
from backup_pipelines.engine.wal import (
    WalArchive,
    WalConflictError,
    WalError,
    WalNotFoundError,
    WalStore,
    list_wal,
    local_wal_storage,
    object_stem,
    prune_wal,
    segment_name,
    segment_number,
    wal_fetch,
    wal_push,
)

SEGMENT = "000000010000000000000003"


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackupStorage]:
    if request.param == "memory":
        yield MemoryStorage("wal")
    elif request.param == "local":
        root = tmp_path / "archive"
        root.mkdir(mode=0o700)
        yield local_wal_storage(root)
    else:
        request.getfixturevalue("aws_env")
        bucket = f"wal-{secrets.token_hex(4)}"
        default_s3_client().create_bucket(Bucket=bucket)
        yield S3Storage(bucket, "wal/main", server_side_encryption="AES256")


def _archive(tmp_path: Path, *storages: BackupStorage) -> WalArchive:
    settings = PitrSettings(archive_dir=tmp_path / "unused")
    return WalArchive("main", settings, [WalStore(s) for s in storages])


def _segment(folder: Path, name: str, seed: int, size: int = 1 << 20) -> Path:
    folder.mkdir(exist_ok=True)
    data = bytes([seed]) * 4096 + os.urandom(16 << 10)
    path = folder / name
    path.write_bytes(data + b"\0" * (size - len(data)))
    return path


def _objects(storage: BackupStorage) -> dict[str, int]:
    return {i.name: i.size for i in storage.list()}


def test_push_then_fetch_gives_identical_bytes_in_the_documented_layout(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    source = _segment(tmp_path / "pg_wal", SEGMENT, 1)
    outcome = wal_push(archive, source)
    assert outcome.stored == [storage.url()] and outcome.already_archived == []
    stem = object_stem(SEGMENT)
    assert sorted(_objects(storage)) == [f"{stem}.meta", f"{stem}.zst"]
    assert _objects(storage)[f"{stem}.zst"] < source.stat().st_size // 4  # compressed
    destination = tmp_path / "RECOVERYXLOG"
    fetched = wal_fetch(archive, SEGMENT, destination)
    assert destination.read_bytes() == source.read_bytes()
    assert fetched.size == source.stat().st_size
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.glob("RECOVERYXLOG.*"))


def test_identical_push_succeeds_again_and_rewrites_nothing(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    source = _segment(tmp_path / "pg_wal", SEGMENT, 2)
    wal_push(archive, source)
    before = {i.name: (i.size, i.modified) for i in storage.list()}
    again = wal_push(archive, source)
    assert again.stored == [] and again.already_archived == [storage.url()]
    assert {i.name: (i.size, i.modified) for i in storage.list()} == before


def test_different_content_under_the_same_name_is_refused(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    original = _segment(tmp_path / "a", SEGMENT, 3)
    wal_push(archive, original)
    impostor = _segment(tmp_path / "b", SEGMENT, 4)
    with pytest.raises(WalConflictError, match="DIFFERENT file under this name"):
        wal_push(archive, impostor)
    wal_fetch(archive, SEGMENT, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == original.read_bytes()


def test_missing_files_and_leftovers_are_not_in_the_archive(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    with pytest.raises(WalNotFoundError, match="not in the WAL archive"):
        wal_fetch(archive, SEGMENT, tmp_path / "out")
    # Data without its record is the leftover of an interrupted push, never an archived file.
    storage.put_bytes(object_stem(SEGMENT) + ".zst", b"half a push")
    with pytest.raises(WalNotFoundError):
        wal_fetch(archive, SEGMENT, tmp_path / "out")
    assert list_wal(archive) == []
    assert not (tmp_path / "out").exists()


def test_a_damaged_copy_is_refused_then_repaired_by_the_identical_original(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    source = _segment(tmp_path / "pg_wal", SEGMENT, 5)
    wal_push(archive, source)
    storage.put_bytes(object_stem(SEGMENT) + ".zst", b"garbage, not zstd")
    destination = tmp_path / "RECOVERYXLOG"
    with pytest.raises(IntegrityError, match="every archived copy is damaged"):
        wal_fetch(archive, SEGMENT, destination)
    assert not destination.exists() and not list(tmp_path.glob("RECOVERYXLOG*"))
    repaired = wal_push(archive, source)
    assert repaired.stored == [storage.url()]
    wal_fetch(archive, SEGMENT, destination)
    assert destination.read_bytes() == source.read_bytes()


def test_every_kind_of_wal_file_round_trips(storage: BackupStorage, tmp_path: Path) -> None:
    archive = _archive(tmp_path, storage)
    names = {
        "00000002.history": b"1\t0/3000000\tbefore 2026-11-24 10:00:00+00\n",
        "000000010000000000000002.00000028.backup": b"START WAL LOCATION: 0/2000028\n",
        "000000010000000000000004.partial": os.urandom(4096),
    }
    for name, data in names.items():
        source = tmp_path / "pg_wal" / name
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(data)
        wal_push(archive, source)
        wal_fetch(archive, name, tmp_path / f"out-{name}")
        assert (tmp_path / f"out-{name}").read_bytes() == data
    assert {e.name: e.kind for e in list_wal(archive)} == {
        "00000002.history": "history",
        "000000010000000000000002.00000028.backup": "backup",
        "000000010000000000000004.partial": "partial",
    }
    with pytest.raises(WalError, match="not a WAL file name"):
        wal_push(archive, tmp_path / "pg_wal" / "00000002.history", "notes.txt")


def test_prune_removes_old_segments_and_keeps_history(
    storage: BackupStorage, tmp_path: Path
) -> None:
    archive = _archive(tmp_path, storage)
    for segno in range(1, 6):
        wal_push(archive, _segment(tmp_path / "pg_wal", segment_name(1, segno), segno, 64 << 10))
    history = tmp_path / "pg_wal" / "00000002.history"
    history.write_bytes(b"1\t0/5000000\tno recovery target specified\n")
    wal_push(archive, history)
    removed = prune_wal(archive, segment_number(segment_name(1, 4)))
    assert removed == [segment_name(1, n) for n in (1, 2, 3)]
    assert [e.name for e in list_wal(archive)] == [
        segment_name(1, 4),
        segment_name(1, 5),
        "00000002.history",
    ]
    wal_fetch(archive, segment_name(1, 4), tmp_path / "out")
    with pytest.raises(WalNotFoundError):
        wal_fetch(archive, segment_name(1, 2), tmp_path / "out2")


def test_two_places_both_hold_it_and_a_damaged_one_falls_back(tmp_path: Path) -> None:
    first, root = MemoryStorage("offsite"), tmp_path / "archive"
    root.mkdir(mode=0o700)
    local = local_wal_storage(root)
    archive = _archive(tmp_path, local, first)
    source = _segment(tmp_path / "pg_wal", SEGMENT, 7)
    outcome = wal_push(archive, source)
    assert sorted(outcome.stored) == sorted([str(root), first.url()])
    assert _objects(first) == _objects(local)
    (root / (object_stem(SEGMENT) + ".zst")).write_bytes(b"bit rot")
    fetched = wal_fetch(archive, SEGMENT, tmp_path / "out")
    assert fetched.source == first.url()
    assert (tmp_path / "out").read_bytes() == source.read_bytes()


def test_a_missing_local_archive_is_never_created(tmp_path: Path) -> None:
    root = tmp_path / "unmounted"
    archive = _archive(tmp_path, local_wal_storage(root))
    with pytest.raises(WalError, match=r"does not exist \(or is not mounted\)") as caught:
        wal_push(archive, _segment(tmp_path / "pg_wal", SEGMENT, 8))
    assert "wal-setup" in (caught.value.hint or "")
    assert not root.exists()
    assert list_wal(archive) == []


def test_the_local_spool_is_renamed_into_place(tmp_path: Path) -> None:
    """A local archive gets the compressed copy beside its final place: no second copy, no
    temporary folder, nothing left over."""
    root = tmp_path / "archive"
    root.mkdir(mode=0o700)
    storage = local_wal_storage(root)
    assert isinstance(storage, LocalStorage)
    spool = storage.spool_path(object_stem(SEGMENT) + ".zst")
    assert spool is not None and spool.parent == root / SEGMENT[:16]
    archive = _archive(tmp_path, storage)
    wal_push(archive, _segment(tmp_path / "pg_wal", SEGMENT, 9))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [f"{object_stem(SEGMENT)}.meta", f"{object_stem(SEGMENT)}.zst"]
    assert all((root / f).stat().st_mode & 0o777 == 0o600 for f in files)
