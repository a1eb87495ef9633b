"""Progress where people look: a live line redrawn in place when the command runs in a terminal
(a real pseudo-terminal here), log lines without any ``\\r`` through a pipe (cron)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines_tests.conftest import VENV_BIN

FINAL_LINE = re.compile(
    r"\rpg_dump progress: [\d.]+ (B|KiB|MiB), done in [\d.]+s, [\d.]+ (B|KiB|MiB)/s\x1b\[K\r?\n"
)


def run_in_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """Run the installed command with stdin, stdout and stderr on a new pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not data:
                break
            output += data
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return status, output.decode("utf-8", "replace")


@pytest.fixture
def project(pg: LocalCluster, sample_db: str, make_project):
    return make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})


def test_backup_in_a_terminal_redraws_one_live_progress_line(project) -> None:
    status, output = run_in_terminal("backup", "prod")
    assert status == 0, output
    assert output.count("\rpg_dump progress: ") >= 2  # drawn, then redrawn in place
    assert FINAL_LINE.search(output), output  # the last state stays on the screen, with a rate
    # No progress as log lines at a terminal; the other log lines are still there.
    assert " INFO pg_dump progress" not in output
    assert " INFO Backup complete: " in output
    assert "backup: " in output and "checksum: ok" in output


def test_backup_through_a_pipe_logs_progress_lines_and_no_carriage_returns(
    project, run_cli
) -> None:
    result = run_cli("backup", "prod", "--progress-interval", "0")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO pg_dump progress: " in line]
    assert len(lines) >= 2  # while it runs (every chunk at interval 0), then the summary
    assert re.search(r" INFO pg_dump progress: [\d.]+ (B|KiB|MiB), [\d.]+ (B|KiB|MiB)/s", lines[0])
    assert re.search(r"done in [\d.]+s, [\d.]+ (B|KiB|MiB)/s$", lines[-1])
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "\x1b[" not in result.stderr


def test_progress_interval_must_be_a_number_of_seconds(project, run_cli) -> None:
    result = run_cli("backup", "prod", "--progress-interval", "soon")
    assert result.returncode == 2
    assert "not a number of seconds" in result.stderr
