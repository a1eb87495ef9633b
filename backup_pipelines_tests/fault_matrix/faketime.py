"""Run the real ``backup-pipelines`` command with a wrong clock (Debian package ``faketime``).

``faketime '+40 days' CMD`` moves the clock of CMD and its children (Python's ``datetime.now()``,
``time.time()``, pg_dump) without touching the machine's clock.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from backup_pipelines_tests.conftest import VENV_BIN


def require_faketime() -> str:
    path = shutil.which("faketime")
    if path is None:
        pytest.fail("faketime is not installed: apt-get install -y faketime (scripts/bootstrap.sh)")
    return path


def run_cli_at(
    offset: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``backup-pipelines ARGS`` with the clock moved by ``offset`` (e.g. ``+40 days``)."""
    return subprocess.run(
        [require_faketime(), offset, str(VENV_BIN / "backup-pipelines"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
