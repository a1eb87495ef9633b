"""The wal-push / wal-fetch contract with PostgreSQL, through the installed command.

PostgreSQL reads only exit statuses: 0 = durably archived, non-zero = retry later; for
restore_command 1 = not in the archive. Anything above 125 restarts the archiver or aborts
recovery, so no ordinary failure may produce one.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from backup_pipelines.engine.wal import (
    WalEntry,
    find_gaps,
    object_stem,
    segment_name,
    segment_number,
    segment_of_lsn,
)

VENV_BIN = Path(sys.executable).parent
SEGMENT = "000000010000000000000003"


def _segment_bytes(seed: int, size: int = 2 << 20) -> bytes:
    # Mostly zeros like a real segment, with a random head so contents differ per seed.
    head = bytes([seed]) * 4096 + os.urandom(64 << 10)
    return head + b"\0" * (size - len(head))


@pytest.fixture
def archive(tmp_path: Path, make_project) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path / "archive"
    folder.mkdir(mode=0o700)
    make_project({"main": {"dsn_env": "UNUSED_DSN", "pitr": {"archive_dir": str(folder)}}})
    return folder


def _write_segment(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _archived_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_push_then_fetch_returns_identical_bytes(archive: Path, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    data = _segment_bytes(1)
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, data)
    pushed = run_cli("wal-push", str(source))
    assert pushed.returncode == 0, pushed.stderr
    stored = archive / object_stem(SEGMENT)
    assert (stored.parent / f"{SEGMENT}.zst").stat().st_size < len(data) // 4  # compressed
    assert (stored.parent / f"{SEGMENT}.meta").exists()
    assert oct((stored.parent / f"{SEGMENT}.zst").stat().st_mode & 0o777) == "0o600"
    assert not list(archive.rglob("*.partial"))

    destination = tmp_path / "restore" / "RECOVERYXLOG"
    destination.parent.mkdir()
    fetched = run_cli("wal-fetch", SEGMENT, str(destination))
    assert fetched.returncode == 0, fetched.stderr
    assert destination.read_bytes() == data


def test_same_name_same_content_succeeds_again(archive: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, _segment_bytes(2))
    assert cli("wal-push", str(source)).returncode == 0
    before = _archived_files(archive)
    again = cli("wal-push", str(source))
    assert again.returncode == 0, again.stderr
    assert "already archived with identical content" in again.stderr
    assert _archived_files(archive) == before


def test_same_name_other_content_is_refused_and_nothing_overwritten(
    archive: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    original = _segment_bytes(3)
    source = _write_segment(tmp_path / "a", SEGMENT, original)
    assert cli("wal-push", str(source)).returncode == 0
    impostor = _write_segment(tmp_path / "b", SEGMENT, _segment_bytes(4))
    refused = cli("wal-push", str(impostor))
    assert refused.returncode == 1
    assert "DIFFERENT file under this name" in refused.stderr
    assert "Nothing was overwritten" in refused.stderr
    destination = tmp_path / "fetched"
    assert cli("wal-fetch", SEGMENT, str(destination)).returncode == 0
    assert destination.read_bytes() == original


def test_archive_unavailable_fails_without_creating_it(archive: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    archive.rmdir()  # an unmounted archive volume
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, _segment_bytes(5))
    result = cli("wal-push", str(source))
    assert result.returncode == 1
    assert "does not exist (or is not mounted)" in result.stderr
    assert not archive.exists()


@pytest.mark.slow
def test_disk_full_mid_write_leaves_nothing_partial(archive: Path, tmp_path: Path) -> None:
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, os.urandom(2 << 20))  # incompressible

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    result = subprocess.run(
        [str(VENV_BIN / "backup-pipelines"), "wal-push", str(source)],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "wal-push FAILED" in result.stderr
    assert _archived_files(archive) == []  # no .partial, no data without a record


def test_fetch_of_missing_file_exits_1(archive: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    destination = tmp_path / "RECOVERYXLOG"
    result = cli("wal-fetch", "00000002.history", str(destination))
    assert result.returncode == 1
    result = cli("wal-fetch", SEGMENT, str(destination))
    assert result.returncode == 1
    assert "not in the WAL archive" in result.stderr
    assert not destination.exists()


def test_corrupted_archived_segment_is_refused(archive: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, _segment_bytes(6))
    assert cli("wal-push", str(source)).returncode == 0
    stored = archive / (object_stem(SEGMENT) + ".zst")
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    destination = tmp_path / "RECOVERYXLOG"
    result = cli("wal-fetch", SEGMENT, str(destination))
    assert result.returncode == 2
    assert 1 < result.returncode <= 125
    assert "REFUSED" in result.stderr
    assert not destination.exists()
    assert not list(tmp_path.glob("RECOVERYXLOG*"))


def test_damaged_copy_is_repaired_by_pushing_the_identical_original(
    archive: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    data = _segment_bytes(7)
    source = _write_segment(tmp_path / "pg_wal", SEGMENT, data)
    assert cli("wal-push", str(source)).returncode == 0
    stored = archive / (object_stem(SEGMENT) + ".zst")
    stored.write_bytes(b"garbage")
    again = cli("wal-push", str(source))
    assert again.returncode == 0, again.stderr
    assert "damaged" in again.stderr
    destination = tmp_path / "fetched"
    assert cli("wal-fetch", SEGMENT, str(destination)).returncode == 0
    assert destination.read_bytes() == data


def test_history_backup_label_and_partial_files_are_archived(
    archive: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    names = {
        "00000002.history": b"1\t0/3000000\tbefore 2026-11-24 10:00:00+00\n",
        "000000010000000000000002.00000028.backup": b"START WAL LOCATION: 0/2000028\n",
        "000000010000000000000004.partial": os.urandom(4096),
    }
    for name, data in names.items():
        source = _write_segment(tmp_path / "pg_wal", name, data)
        assert cli("wal-push", str(source)).returncode == 0, name
        destination = tmp_path / f"out-{name}"
        assert cli("wal-fetch", name, str(destination)).returncode == 0
        assert destination.read_bytes() == data


def test_unexpected_names_and_missing_files_fail_with_status_1(
    archive: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "notes.txt"
    bad.write_text("not wal")
    result = cli("wal-push", str(bad))
    assert result.returncode == 1
    assert "not a WAL file name" in result.stderr
    result = cli("wal-push", str(tmp_path / SEGMENT))
    assert result.returncode == 1
    result = cli("--config", str(tmp_path / "missing.yaml"), "wal-push", str(bad))
    assert result.returncode == 1


def test_segment_arithmetic_and_gap_detection() -> None:
    size = 16 << 20
    assert segment_of_lsn("0/2000028", 1, size) == "000000010000000000000002"
    assert segment_of_lsn("1/FF000000", 3, size) == "0000000300000001000000FF"
    assert segment_number("000000010000000100000000", size) == 256
    assert segment_name(1, 256, size) == "000000010000000100000000"
    entries = [WalEntry(segment_name(1, n, size), "segment", None) for n in (2, 3, 5, 6, 9)] + [
        WalEntry(segment_name(2, 10, size), "segment", None)
    ]
    gaps = find_gaps(entries, 1, size)
    assert [(g.first_missing, g.count) for g in gaps] == [
        ("000000010000000000000001", 1),
        ("000000010000000000000004", 1),
        ("000000010000000000000007", 2),
    ]
    assert find_gaps(entries[:2], None, size) == []
