"""Base backups on a Python without tarfile extraction filters (Debian 12's own python3 is
3.11.2; filters came in 3.11.4): the same safety rules apply, and a real base backup still
extracts and verifies."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.backup.base_reader import _extract_member, verify_base_backup
from backup_pipelines_tests.pitr_support import PitrSetup, start_pitr_cluster


@pytest.fixture
def no_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)


def _archive(*members: tuple[tarfile.TarInfo, bytes]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data else None)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r")


def _file(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid = info.gid = 12345
    return info


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.usefixtures("no_filters")
@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_file("../escape"), "outside the folder"),
        (_file("/etc/escape"), "outside the folder"),
        (_link("pg_tblspc/16384", "/var/lib/elsewhere"), "points outside"),
        (_link("base/evil", "../../etc"), "points outside"),
    ],
)
def test_members_that_would_leave_the_folder_are_refused(
    tmp_path: Path, member: tarfile.TarInfo, reason: str
) -> None:
    archive = _archive((member, b"x" if member.isfile() else b""))
    with pytest.raises(tarfile.TarError, match=reason):
        _extract_member(archive, archive.getmembers()[0], tmp_path / "data")
    assert not (tmp_path / "escape").exists()


@pytest.mark.usefixtures("no_filters")
def test_setuid_and_group_write_bits_are_dropped_and_we_own_the_file(tmp_path: Path) -> None:
    archive = _archive((_file("global/pg_control", 0o6777), b"control"))
    _extract_member(archive, archive.getmembers()[0], tmp_path)
    extracted = tmp_path / "global" / "pg_control"
    assert extracted.read_bytes() == b"control"
    assert extracted.stat().st_mode & 0o7777 == 0o755
    assert extracted.stat().st_uid != 12345


@pytest.mark.postgres
def test_a_real_base_backup_verifies_without_extraction_filters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup: PitrSetup = start_pitr_cluster(monkeypatch)
    try:
        setup.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        artifact = run_base_backup(setup.target)
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        outcomes = {o.name: o for o in verify_base_backup(artifact, setup.target)}
        assert outcomes["checksum"].passed and outcomes["manifest"].passed, outcomes
    finally:
        setup.close()
