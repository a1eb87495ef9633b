"""What every bad-input case asserts about the command line's answer, and helpers to run it as
a second OS user (root reads and writes everything, so permission cases need another user)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import backup_pipelines

VENV_BIN = Path(sys.executable).parent


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of stderr that report an error (logged ERROR, or printed before logging)."""
    return [
        line
        for line in result.stderr.splitlines()
        if " ERROR " in line or line.startswith("backup-pipelines: ")
    ]


def assert_clear_error(result: subprocess.CompletedProcess[str], status: int, *phrases: str) -> str:
    """Exit ``status``, no traceback, exactly one error line, and it contains every phrase."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == status, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def assert_reported(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """check-config: exit 2, no traceback, one problem line (stdout) with every phrase."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    matching = [line for line in result.stdout.splitlines() if all(p in line for p in phrases)]
    assert len(matching) == 1, output
    return matching[0]


@contextlib.contextmanager
def second_os_user() -> Iterator[str]:
    """A throwaway OS user (and group) for permission cases; removed afterwards.

    useradd and userdel lock /etc/passwd: tests that use this carry
    ``@pytest.mark.xdist_group("os-users")`` so parallel workers never race for the lock.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second OS user")
    name = f"bpt{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True)
    subprocess.run(["useradd", "-M", "-g", name, "-s", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def cli_as(user: str, folder: Path) -> list[str]:
    """argv prefix running ``backup-pipelines`` as ``user``.

    This project's interpreter may live under /root (not reachable by other users): then the
    system Python of the same version runs the package from its source and site-packages.
    """
    probe = subprocess.run(
        ["runuser", "-u", user, "--", str(VENV_BIN / "python"), "-c", "import backup_pipelines"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return ["runuser", "-u", user, "--", str(VENV_BIN / "backup-pipelines")]
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.skip(f"{user} cannot run {sys.executable} and {system_python} is missing")
    repo = Path(backup_pipelines.__file__).resolve().parents[1]
    site = sysconfig.get_paths()["purelib"]
    launcher = folder / "backup-pipelines-as-user"
    launcher.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(f'{repo}:{site}')} exec {system_python} -c "
        "'import sys; from backup_pipelines.cli import main; sys.exit(main())' \"$@\"\n"
    )
    launcher.chmod(0o755)
    return ["runuser", "-u", user, "--", str(launcher)]


def run_as(
    user: str, folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_as(user, folder), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        env={**os.environ, **(env or {})},
    )
