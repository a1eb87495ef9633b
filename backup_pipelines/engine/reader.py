"""Reading a backup back: stored bytes -> (decrypt) -> decompress -> the dump pg_dump wrote."""

from __future__ import annotations

from collections.abc import Iterator

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.compression import decompress_chunks
from backup_pipelines.engine.encryption import decrypt_chunks


def outer_codec(dump_format: str, compression: str) -> str:
    """The compression applied around pg_dump's output (custom+gzip compresses inside pg_dump;
    for the directory format the output is the tar of pg_dump's folder, whose data files
    pg_dump compresses itself with gzip)."""
    if compression == "zstd":
        return "zstd"
    if compression == "gzip" and dump_format == "plain":
        return "gzip"
    return "none"


def decrypted_chunks(artifact: BackupArtifact) -> Iterator[bytes]:
    """The stored bytes, streamed through ``gpg --decrypt`` when the backup is encrypted.

    The key is found from the targets file (the backup's target first): the passphrase whose
    fingerprint ``.meta`` records, or a secret key of one of its recipients.
    """
    mode = artifact.meta.encryption.get("mode", "none")
    if mode == "none":
        yield from artifact.stored_chunks()
        return
    yield from decrypt_chunks(
        artifact.meta.encryption,
        artifact.stored_chunks(),
        name=artifact.path.name,
        target=artifact.meta.target,
    )


def dump_chunks(artifact: BackupArtifact) -> Iterator[bytes]:
    """The dump exactly as pg_dump produced it, streamed; raises IntegrityError on corruption."""
    codec = outer_codec(artifact.meta.format, artifact.meta.compression)
    yield from decompress_chunks(codec, decrypted_chunks(artifact), name=artifact.path.name)
