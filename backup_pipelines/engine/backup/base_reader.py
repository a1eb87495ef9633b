"""Reading a base backup back: stream-extract it into a data directory while checking its
SHA-256, and verify it with pg_verifybackup against its own manifest."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.base import BaseBackupMeta, as_base
from backup_pipelines.engine.backup.server_config import CONFIG_MEMBER_PREFIX
from backup_pipelines.engine.compression import CHUNK_SIZE, decompress_chunks
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.encryption import decrypt_chunks
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError, ToolError
from backup_pipelines.engine.postgres import find_tools, server_major
from backup_pipelines.engine.progress import Progress
from backup_pipelines.engine.verify import CheckOutcome, check_checksum


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    """Extract one member with tarfile's "data" filter rules: inside ``destination`` only, no
    devices, no links leading out, no setuid/setgid or group/other write bits, owned by us."""
    if hasattr(tarfile, "data_filter"):
        archive.extract(member, destination, filter="data")
        return
    # Python before 3.11.4 (Debian 12's own python3 is 3.11.2) has no extraction filters: the
    # same rules by hand, so a crafted archive cannot write outside the restore folder.
    root = destination.resolve()
    target = (root / member.name).resolve()
    if member.name.startswith("/") or not target.is_relative_to(root):
        raise tarfile.TarError(f"member {member.name!r} would be written outside the folder")
    if member.isdev() or member.isfifo():
        raise tarfile.TarError(f"member {member.name!r} is a device or FIFO")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else root
        link = (base / member.linkname).resolve()
        if member.linkname.startswith("/") or not link.is_relative_to(root):
            raise tarfile.TarError(f"link {member.name!r} points outside the folder")
    member = copy.copy(member)
    member.mode &= ~0o7022
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    archive.extract(member, destination, numeric_owner=True)


class _ChunkStream(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def extract_base_backup(
    artifact: BackupArtifact,
    meta: BaseBackupMeta,
    destination: Path,
    progress: Progress | None = None,
    server_config: dict[str, bytes] | None = None,
) -> int:
    """Stream-extract into ``destination`` (an existing empty folder) while verifying the stored
    file's SHA-256; raises IntegrityError (after emptying ``destination``) on any mismatch.
    ``progress`` counts the bytes of the stored file read so far. The captured configuration
    files (``.meta`` ``server_config``) never land in the data directory: they go into
    ``server_config`` (tar member name -> bytes) when given, else are skipped."""
    import hashlib

    digest = hashlib.sha256()
    stored_size = 0

    def hashed() -> Iterator[bytes]:
        nonlocal stored_size
        for chunk in artifact.stored_chunks():
            digest.update(chunk)
            stored_size += len(chunk)
            if progress is not None:
                progress.advance(len(chunk))
            yield chunk

    members = 0
    try:
        stored = hashed()
        if meta.encryption.get("mode", "none") != "none":
            stored = decrypt_chunks(
                meta.encryption, stored, name=artifact.path.name, target=meta.target
            )
        stream = io.BufferedReader(
            _ChunkStream(decompress_chunks(meta.compression, stored, name=artifact.path.name)),
            CHUNK_SIZE,
        )
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.name.startswith(CONFIG_MEMBER_PREFIX):
                    handle = archive.extractfile(member)
                    if server_config is not None and handle is not None:
                        server_config[member.name] = handle.read()
                    continue
                _extract_member(archive, member, destination)
                members += 1
            # Drain the tar's end-of-archive blocks so the checksum covers the whole file.
            while stream.read(CHUNK_SIZE):
                pass
        if digest.hexdigest() != meta.sha256 or stored_size != meta.size_bytes:
            raise IntegrityError(
                f"{artifact.path.name}: SHA-256 mismatch (file {digest.hexdigest()[:16]}…, "
                f".meta {meta.sha256[:16]}…): the base backup was modified or damaged",
                hint="use another base backup (or its offsite copy)",
            )
        if (
            not (destination / "backup_manifest").exists()
            or not (destination / "global" / "pg_control").exists()
        ):
            raise IntegrityError(
                f"{artifact.path.name} does not contain a complete data directory "
                "(backup_manifest or global/pg_control missing)"
            )
    except tarfile.TarError as exc:
        empty_dir(destination)
        raise IntegrityError(f"{artifact.path.name} is not a readable tar archive: {exc}") from None
    except BaseException:
        empty_dir(destination)
        raise
    return members


def empty_dir(folder: Path) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def chown_tree(root: Path, user: str) -> None:
    """Give a restored data directory to the server's OS user (only possible, and needed, as root)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(root):
        os.lchown(folder, entry.pw_uid, entry.pw_gid)
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid)


def check_manifest(artifact: BackupArtifact, meta: BaseBackupMeta, target: Target) -> CheckOutcome:
    """Extract into a scratch folder and run ``pg_verifybackup`` against the backup's manifest
    (file sizes and checksums, and the WAL range parsed with pg_waldump)."""
    try:
        # pg_verifybackup parses the backup's WAL with pg_waldump: the server's own version.
        tools = find_tools(server_major(meta.server_version_num), target.settings.pg_bin_dir)
        verifier = tools.path("pg_verifybackup")
    except ToolError as exc:
        return CheckOutcome("manifest", False, exc.message)
    scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=artifact.path.parent))
    try:
        try:
            members = extract_base_backup(artifact, meta, scratch)
        except BackupPipelinesError as exc:
            return CheckOutcome("manifest", False, exc.message)
        result = subprocess.run(
            [verifier, "--quiet", str(scratch)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            return CheckOutcome(
                "manifest",
                False,
                f"pg_verifybackup found problems in {artifact.path.name}: "
                + "; ".join(detail[:10]),
                {"members": members},
            )
        return CheckOutcome(
            "manifest",
            True,
            f"pg_verifybackup: every file matches backup_manifest and WAL {meta.start_lsn}..{meta.end_lsn} "
            f"parses ({members} tar members)",
            {"members": members},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_base_backup(artifact: BackupArtifact, target: Target) -> list[CheckOutcome]:
    """Checksum first (cheap); the manifest check only for a file whose checksum matches."""
    _, meta = as_base(artifact)
    outcomes = [check_checksum(artifact)]
    if outcomes[0].passed:
        outcomes.append(check_manifest(artifact, meta, target))
    return outcomes
