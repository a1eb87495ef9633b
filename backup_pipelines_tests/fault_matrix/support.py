"""What every fault-matrix test asserts the same way: a failure is one clear log record (what went
wrong, then at most one "What to do:" line), never a traceback, with the documented exit status;
and real faults: a full filesystem (tmpfs), a port someone else listens on."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# The CLI's log format: "2026-01-01 12:00:00,123 LEVEL message".
_RECORD_START = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (\w+) ")

EXIT_FAILED = 1
EXIT_REFUSED = 2


def log_records(stderr: str) -> list[tuple[str, str]]:
    """``(level, text)`` for every log record on the CLI's stderr (continuation lines joined)."""
    records: list[tuple[str, list[str]]] = []
    for line in stderr.splitlines():
        match = _RECORD_START.match(line)
        if match:
            records.append((match.group(1), [line[match.end() :]]))
        elif records:
            records[-1][1].append(line)
        else:
            records.append(("RAW", [line]))
    return [(level, "\n".join(lines)) for level, lines in records]


def assert_clear_failure(
    result: subprocess.CompletedProcess[str], exit_code: int, *needles: str
) -> str:
    """The command failed with ``exit_code`` and one clear ERROR record holding every needle.

    Clear means: no traceback anywhere, exactly one ERROR record, and that record is the message
    plus at most one "What to do:" line. Returns the record.
    """
    output = result.stdout + result.stderr
    assert result.returncode == exit_code, output
    assert "Traceback" not in output, output
    errors = [text for level, text in log_records(result.stderr) if level == "ERROR"]
    assert len(errors) == 1, result.stderr
    lines = errors[0].splitlines()
    assert len(lines) <= 2, errors[0]
    if len(lines) == 2:
        assert lines[1].startswith("What to do: "), errors[0]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]


def assert_clear_message(message: str, *needles: str) -> None:
    """The same standard for a message the engine returns (Dagster metadata, drill results)."""
    assert "Traceback" not in message, message
    lines = message.splitlines()
    assert 1 <= len(lines) <= 2, message
    if len(lines) == 2:
        assert lines[1].startswith("What to do: "), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that something really listens on, for as long as the block runs."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem (``mount -t tmpfs -o size=...``), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(folder: Path, leave_free: int) -> Path:
    """Fill the filesystem of ``folder`` until about ``leave_free`` bytes are left."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with filler.open("wb") as handle:
        remaining = max(free - leave_free, 0)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            chunk = block[: min(len(block), remaining)]
            try:
                handle.write(chunk)
                handle.flush()
            except OSError:
                break
            remaining -= len(chunk)
    return filler
