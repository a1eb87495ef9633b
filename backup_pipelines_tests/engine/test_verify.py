"""Corrupt, truncated and tampered backups must fail verification with a reason."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import BackupArtifact, load_artifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.verify import verify_artifact

log = logging.getLogger("test")


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(
    params=[("plain", "gzip"), ("plain", "zstd"), ("custom", "gzip"), ("custom", "zstd")],
    ids=lambda p: "-".join(p),
)
def artifact(request, pg: LocalCluster, sample_db: str, make_project) -> BackupArtifact:
    dump_format, compression = request.param
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    return run_backup(config.target("prod"), log=log)


def test_intact_backup_verifies(artifact: BackupArtifact) -> None:
    outcomes = verify_artifact(artifact)
    assert [(o.name, o.passed) for o in outcomes] == [
        ("checksum", True),
        ("readable", True),
        ("globals", True),
    ]


def test_flipped_byte_fails_the_checksum(artifact: BackupArtifact) -> None:
    flip_byte(artifact.path)
    outcome = verify_artifact(artifact)[0]
    assert not outcome.passed
    assert "SHA-256 mismatch" in outcome.message and "modified or damaged" in outcome.message


def test_truncated_backup_with_forged_checksum_fails_decoding(artifact: BackupArtifact) -> None:
    """Someone truncates the file and rewrites both sidecars: decoding still catches it."""
    data = artifact.path.read_bytes()
    artifact.path.write_bytes(data[: len(data) // 2])
    forged = forge_sidecars(artifact)
    outcomes = verify_artifact(forged)
    assert outcomes[0].passed  # the forged checksum matches...
    assert not outcomes[1].passed  # ...but the archive is incomplete
    assert any(word in outcomes[1].message for word in ("truncated", "pg_restore", "incomplete"))


def test_tampered_content_with_forged_checksum_fails_decoding(artifact: BackupArtifact) -> None:
    flip_byte(artifact.path, offset_from_end=len(artifact.path.read_bytes()) // 2)
    outcomes = verify_artifact(forge_sidecars(artifact))
    assert outcomes[0].passed and not outcomes[1].passed


def forge_sidecars(artifact: BackupArtifact) -> BackupArtifact:
    import hashlib

    from backup_pipelines.engine.artifacts import sha256_line, write_meta

    data = artifact.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    artifact.sha256_path.write_text(sha256_line(digest, artifact.path.name))
    write_meta(
        artifact.meta_path,
        artifact.meta.model_copy(update={"sha256": digest, "size_bytes": len(data)}),
    )
    return load_artifact(artifact.path)


def test_missing_sidecar_fails(artifact: BackupArtifact) -> None:
    artifact.sha256_path.unlink()
    outcome = verify_artifact(artifact)[0]
    assert not outcome.passed and "checksum file missing" in outcome.message
