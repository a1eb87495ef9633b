"""Verifying a backup without restoring it: checksum, full decode, and the archive's own structure."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from dataclasses import dataclass, field
from typing import Any

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.counting import python_encoding
from backup_pipelines.engine.backup.directory import read_dump_directory
from backup_pipelines.engine.backup.globals import GLOBALS_TRAILER, globals_sql_chunks
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError
from backup_pipelines.engine.postgres import find_tools
from backup_pipelines.engine.processes import one_line, spawn, stop
from backup_pipelines.engine.reader import dump_chunks

PLAIN_DUMP_TRAILER = b"-- PostgreSQL database dump complete"


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    # What to do, when the failure is not the file's fault (e.g. the key is not configured).
    hint: str | None = None


def check_checksum(artifact: BackupArtifact) -> CheckOutcome:
    """Recompute the stored file's SHA-256 and compare it with ``.sha256`` and ``.meta``."""
    try:
        recorded = artifact.recorded_sha256()
    except IntegrityError as exc:
        return CheckOutcome("checksum", False, exc.message, hint=exc.hint)
    digest = hashlib.sha256()
    size = 0
    for chunk in artifact.stored_chunks():
        digest.update(chunk)
        size += len(chunk)
    actual = digest.hexdigest()
    details = {
        "actual_sha256": actual,
        "recorded_sha256": recorded,
        "meta_sha256": artifact.meta.sha256,
        "actual_size": size,
        "recorded_size": artifact.meta.size_bytes,
    }
    if actual != recorded or actual != artifact.meta.sha256:
        return CheckOutcome(
            "checksum",
            False,
            f"{artifact.path.name}: SHA-256 mismatch (file {actual[:16]}…, .sha256 {recorded[:16]}…, "
            f".meta {artifact.meta.sha256[:16]}…): the file was modified or damaged after it was written",
            details,
        )
    if size != artifact.meta.size_bytes:
        return CheckOutcome(
            "checksum",
            False,
            f"{artifact.path.name}: size {size} differs from recorded {artifact.meta.size_bytes}",
            details,
        )
    return CheckOutcome("checksum", True, f"SHA-256 {actual} matches .sha256 and .meta", details)


def check_readable(artifact: BackupArtifact) -> CheckOutcome:
    """Decode the whole backup; plain dumps must end with pg_dump's trailer, custom ones must
    list, directory ones must hold every file their TOC lists, each decoding in full."""
    try:
        if artifact.meta.format == "custom":
            return _check_custom(artifact)
        if artifact.meta.format == "directory":
            return _check_directory(artifact)
        size = 0
        tail = b""
        for chunk in dump_chunks(artifact):
            size += len(chunk)
            tail = (tail + chunk)[-4096:]
        if PLAIN_DUMP_TRAILER not in tail:
            return CheckOutcome(
                "readable",
                False,
                f"{artifact.path.name} decompresses but the SQL ends without pg_dump's "
                "'dump complete' trailer: the dump is incomplete",
                {"dump_bytes": size},
            )
        if size != artifact.meta.dump_bytes:
            return CheckOutcome(
                "readable",
                False,
                f"decoded {size} bytes, .meta records {artifact.meta.dump_bytes}",
                {"dump_bytes": size},
            )
        return CheckOutcome(
            "readable",
            True,
            f"decompressed {size} bytes of SQL ending with pg_dump's trailer",
            {"dump_bytes": size},
        )
    except BackupPipelinesError as exc:
        return CheckOutcome("readable", False, exc.message, hint=exc.hint)


def _check_custom(artifact: BackupArtifact) -> CheckOutcome:
    tools = find_tools(None)
    # `pg_restore -f /dev/null` reads and decompresses every data block, not just the TOC.
    proc, stderr = spawn(
        [tools.path("pg_restore"), "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    entries = _feed(proc, artifact, count_stdout_lines=True)
    if proc.returncode != 0:
        return CheckOutcome(
            "readable", False, f"pg_restore --list failed: {one_line(stderr.text())}"
        )
    proc, stderr = spawn([tools.path("pg_restore"), "-f", "/dev/null"], stdin=subprocess.PIPE)
    size = _feed(proc, artifact)
    if proc.returncode != 0:
        return CheckOutcome(
            "readable", False, f"pg_restore could not read the archive: {one_line(stderr.text())}"
        )
    return CheckOutcome(
        "readable",
        True,
        f"custom archive lists {entries} entries and all data blocks decode",
        {"toc_entries": entries, "dump_bytes": size},
    )


def _check_directory(artifact: BackupArtifact) -> CheckOutcome:
    meta = artifact.meta
    encoding = python_encoding(meta.database_encoding or "UTF8") or "utf-8"
    report = read_dump_directory(dump_chunks(artifact), name=artifact.path.name, encoding=encoding)
    details: dict[str, Any] = {
        "dump_bytes": report.tar_bytes,
        "data_bytes": report.data_bytes,
        "members": len(report.members),
        "toc_entries": report.toc_entries,
    }
    if report.tar_bytes != meta.dump_bytes:
        return CheckOutcome(
            "readable",
            False,
            f"decoded {report.tar_bytes} bytes of tar, .meta records {meta.dump_bytes}",
            details,
        )
    # The rows in the data files must be the rows .meta promises (what a restore checks).
    counted = report.row_counts or {}
    differ = sorted(t for t, rows in meta.row_counts.items() if counted.get(t) != rows)
    if report.row_counts is None or differ:
        return CheckOutcome(
            "readable",
            False,
            f"{artifact.path.name}: the data files hold other row counts than .meta records"
            + (f" ({', '.join(differ[:5])})" if differ else " (not readable as COPY data)"),
            details,
        )
    return CheckOutcome(
        "readable",
        True,
        f"directory dump: toc.dat and all {len(report.members) - 1} files it lists are present, "
        f"every data file decodes ({report.data_bytes} bytes) with the rows .meta records",
        details,
    )


def _feed(
    proc: subprocess.Popen[bytes], artifact: BackupArtifact, count_stdout_lines: bool = False
) -> int:
    import threading

    assert proc.stdin is not None
    lines = [0]

    def drain() -> None:
        if proc.stdout is not None:
            for line in proc.stdout:
                if not line.startswith(b";"):
                    lines[0] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    size = 0
    try:
        for chunk in dump_chunks(artifact):
            size += len(chunk)
            proc.stdin.write(chunk)
    except BrokenPipeError:
        pass
    except BaseException:
        stop(proc)
        raise
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    proc.wait()
    reader.join()
    return lines[0] if count_stdout_lines else size


def describe_role_passwords(artifact: BackupArtifact) -> str:
    """``role passwords included`` or why they are not (never the passwords themselves)."""
    entry = artifact.meta.globals
    if entry is None:
        return "no globals in this backup"
    if entry.role_passwords:
        return "role passwords included"
    return f"role passwords NOT included: {entry.role_passwords_reason or 'pg_authid not readable'}"


def check_globals(artifact: BackupArtifact) -> CheckOutcome:
    """The server's globals stored with the backup: present, checksum as recorded, and
    decoding (decrypt, decompress) to pg_dumpall's complete output."""
    entry = artifact.meta.globals
    if entry is None:
        return CheckOutcome(
            "globals",
            True,
            "no globals file: this backup was taken before backups captured the server's "
            "roles; a restore onto a new server needs its roles created first",
        )
    name = entry.file_name
    try:
        recorded = artifact.recorded_globals_sha256()
        digest = hashlib.sha256()
        size = 0
        for chunk in artifact.globals_stored_chunks():
            digest.update(chunk)
            size += len(chunk)
        actual = digest.hexdigest()
        details: dict[str, Any] = {"globals_file": name, "globals_size": size}
        if actual != recorded or actual != entry.sha256.lower() or size != entry.size_bytes:
            return CheckOutcome(
                "globals",
                False,
                f"globals file {name}: SHA-256 or size differs from its .sha256 and the .meta "
                "(damaged or replaced): the roles cannot be trusted to recreate on a new server",
                details,
                hint="use another backup, or the offsite copy of this one",
            )
        sql_bytes = 0
        tail = b""
        for chunk in globals_sql_chunks(artifact):
            sql_bytes += len(chunk)
            tail = (tail + chunk)[-4096:]
        if GLOBALS_TRAILER not in tail or sql_bytes != entry.sql_bytes:
            return CheckOutcome(
                "globals",
                False,
                f"globals file {name} decodes to {sql_bytes} bytes without pg_dumpall's "
                f"complete output (.meta records {entry.sql_bytes}): it is incomplete",
                details,
                hint="use another backup, or the offsite copy of this one",
            )
    except BackupPipelinesError as exc:
        return CheckOutcome(
            "globals",
            False,
            f"globals of the backup set: {exc.message}",
            hint=exc.hint or "use another backup, or the offsite copy of this one",
        )
    return CheckOutcome(
        "globals",
        True,
        f"globals file {name} intact: {entry.roles} roles, {describe_role_passwords(artifact)}",
        {**details, "roles": entry.roles, "role_passwords": str(entry.role_passwords).lower()},
    )


def verify_artifact(artifact: BackupArtifact) -> list[CheckOutcome]:
    """Checksum first; decoding a file whose checksum is wrong proves nothing. Then the
    globals stored with it (a backup set without intact globals fails)."""
    outcomes = [check_checksum(artifact)]
    if outcomes[0].passed:
        outcomes.append(check_readable(artifact))
        outcomes.append(check_globals(artifact))
    return outcomes
