"""Parsed ``.meta`` files are cached while unchanged (sensors list every backup on each tick),
and a changed, replaced, damaged or deleted ``.meta`` is never answered from the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backup_pipelines.engine import artifacts
from backup_pipelines.engine.artifacts import list_artifacts, read_meta, write_meta
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines_tests.engine.storage_helpers import fake_backup


def test_unchanged_meta_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for day in range(1, 4):
        fake_backup(tmp_path, "app", started_at=None, payload=f"-- {day}".encode())
    parsed: list[str] = []
    real_parse = artifacts.parse_meta

    def counting_parse(raw: bytes | str, source: str) -> artifacts.BackupMeta:
        parsed.append(source)
        return real_parse(raw, source)

    monkeypatch.setattr(artifacts, "parse_meta", counting_parse)
    first = list_artifacts(tmp_path)
    for _ in range(5):
        assert [a.meta for a in list_artifacts(tmp_path)] == [a.meta for a in first]
    assert len(parsed) <= len(first)  # earlier reads may already have filled the cache


def test_rewritten_meta_is_read_again(tmp_path: Path) -> None:
    artifact = fake_backup(tmp_path, "app", verified=None)
    assert read_meta(artifact.meta_path).verification is None
    # How verify records its result: a new file renamed over the old one.
    write_meta(
        artifact.meta_path, artifact.meta.model_copy(update={"verification": {"passed": False}})
    )
    assert read_meta(artifact.meta_path).verification == {"passed": False}


def test_meta_edited_in_place_is_read_again(tmp_path: Path) -> None:
    artifact = fake_backup(tmp_path, "app")
    assert read_meta(artifact.meta_path).purpose == "scheduled"
    document = json.loads(artifact.meta_path.read_text())
    document["purpose"] = "manual____"
    with artifact.meta_path.open("r+") as handle:  # an editor writing the same inode
        handle.write(json.dumps(document, indent=2) + "\n")
        handle.truncate()
    assert read_meta(artifact.meta_path).purpose == "manual____"


def test_damaged_or_deleted_meta_is_never_answered_from_cache(tmp_path: Path) -> None:
    artifact = fake_backup(tmp_path, "app")
    read_meta(artifact.meta_path)
    stat = artifact.meta_path.stat()
    artifact.meta_path.write_bytes(b"{not json" + b" " * 100)
    # Even with its old timestamps put back, the size and ctime give the change away.
    os.utime(artifact.meta_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(IntegrityError, match="not valid JSON"):
        read_meta(artifact.meta_path)
    artifact.meta_path.unlink()
    with pytest.raises(IntegrityError, match="metadata file missing"):
        read_meta(artifact.meta_path)
    assert list_artifacts(tmp_path) == []
