"""How PostgreSQL calls us: ``archive_command`` / ``restore_command``, the postgresql.conf
lines, and the archive folder owned by the server's OS user."""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.errors import ConfigError, RefusedError
from backup_pipelines.engine.fsutil import SHARED_DIR_MODE, ensure_private_dir, share_tree
from backup_pipelines.engine.wal.archive import pitr_settings

logger = logging.getLogger("backup_pipelines")


def default_command() -> str:
    """This installation's ``backup-pipelines`` executable, as an absolute path."""
    beside = Path(sys.executable).parent / "backup-pipelines"
    if beside.exists():
        return str(beside)
    found = shutil.which("backup-pipelines")
    return found or "backup-pipelines"


def tool_command(config: ProjectConfig, target: Target) -> str:
    settings = pitr_settings(target)
    prefix = settings.command or shlex.quote(default_command())
    if config.source_path is None:
        return prefix
    return f"{prefix} --config {shlex.quote(str(config.source_path))}"


def _spool_option(target: Target) -> str:
    """``--spool-dir`` in async mode: the per-segment calls then only check the spool."""
    settings = pitr_settings(target)
    if not settings.async_archive or settings.spool_dir is None:
        return ""
    return f" --spool-dir {shlex.quote(str(settings.spool_dir))}"


def archive_command(config: ProjectConfig, target: Target) -> str:
    return (
        f"{tool_command(config, target)} wal-push --target {target.name}{_spool_option(target)} %p"
    )


def restore_command(config: ProjectConfig, target: Target) -> str:
    return (
        f"{tool_command(config, target)} wal-fetch --target {target.name}"
        f"{_spool_option(target)} %f %p"
    )


def conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def postgresql_conf_lines(
    config: ProjectConfig, target: Target, archive_timeout_seconds: int = 60
) -> list[str]:
    """The lines that turn on archiving into this target's WAL archive."""
    return [
        "wal_level = replica",
        "archive_mode = on",
        f"archive_command = {conf_quote(archive_command(config, target))}",
        f"archive_timeout = {archive_timeout_seconds}s",
    ]


def setup_archive_dir(
    path: Path,
    server_os_user: str,
    group: int | None = None,
    *,
    what: str = "WAL archive folder (pitr.archive_dir)",
) -> Path:
    """Create the local archive folder (or the async spool: ``what``) 0700, owned by the
    server's OS user.

    A folder that already exists keeps its owner and mode (someone chose them); it is only
    checked: a warning says when the server's OS user apparently cannot write it. With
    ``group`` (``pitr.archive_group``) the folder is 2750 with that group, and what is already
    archived is brought to the shared layout too (files 0640, folders 2750, that group).
    """
    import pwd

    entry = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(server_os_user)
        except KeyError:
            raise ConfigError(
                f"OS user {server_os_user!r} does not exist",
                hint="set pitr.server_os_user to the user PostgreSQL runs as",
            ) from None
    existed = path.exists()
    # Missing parents get 0711: the server's OS user must reach the archive through them.
    if group is None:
        ensure_private_dir(path, what=what, parent_mode=0o711)
    else:
        ensure_private_dir(path, what=what, mode=SHARED_DIR_MODE, parent_mode=0o711, group=group)
    if entry is not None and existed:
        if not _writable_by(path, entry):
            logger.warning(
                f"{what}: {path} exists and {server_os_user} apparently cannot write "
                f"it: archiving will fail until you run `chown {server_os_user}: {path}` (its "
                "owner and mode were left as they are)"
            )
    elif entry is not None:
        os.chown(path, entry.pw_uid, entry.pw_gid if group is None else group)
        # The server user must be able to reach the folder through its parents.
        parent = path.parent
        while parent != parent.parent:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                logger.warning(
                    f"{parent} is not searchable by other users: {server_os_user} may be unable "
                    f"to reach {path} (chmod o+x {parent})"
                )
                break
            parent = parent.parent
    if group is not None:
        share_tree(path, group, what=what)
    return path


def _writable_by(path: Path, user: Any) -> bool:
    """Whether ``user`` (a pwd entry) may create files in ``path``, judged from its mode bits."""
    import grp

    info = path.stat()
    if info.st_uid == user.pw_uid:
        return info.st_mode & 0o300 == 0o300
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    if info.st_gid in groups:
        return info.st_mode & 0o030 == 0o030
    return info.st_mode & 0o003 == 0o003


def check_server_user_can_run(config: ProjectConfig, target: Target, user: str) -> str:
    """Run the archive command's program as ``user`` (the server's OS user), the way
    PostgreSQL will; refuse (RefusedError, exit 2) naming the first folder or file on its way
    (the program, its interpreter through symlinks, the targets file) that ``user`` cannot
    reach. Returns what was checked, for the operator."""
    argv = shlex.split(tool_command(config, target))
    if not argv:
        raise ConfigError("pitr.command is empty", hint="remove it or name the program to run")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(
                f"OS user {user!r} does not exist",
                hint="set pitr.server_os_user to the user PostgreSQL runs as",
            ) from None
        prefix = ["runuser", "-u", user, "--"]
    elif pwd.getpwuid(os.geteuid()).pw_name == user:
        prefix = []
    else:
        return f"not checked that {user} can run {argv[0]} (run wal-setup as root or as {user})"
    program = shutil.which(argv[0]) or argv[0]
    result = subprocess.run(
        [*prefix, program, *argv[1:], "--help"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    needs: list[tuple[Path, str]] = [(Path(program), "-x")]
    interpreter = _shebang_interpreter(Path(program))
    if interpreter is not None:
        needs.append((interpreter, "-x"))
    if config.source_path is not None:
        needs.append((Path(config.source_path).absolute(), "-r"))
    for path, test in needs:
        blocked = _first_blocked(path, test, prefix)
        if blocked is not None:
            raise RefusedError(
                f"the server's OS user {user} cannot run the archive command: {blocked}",
                hint=f"install backup-pipelines where {user} can reach it (e.g. a virtualenv under "
                "/opt/backup_pipelines made from the system python3), or give it access "
                f"(chmod o+x on that folder), or set pitr.command to a program {user} can run; "
                "then run wal-setup again",
            )
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).strip().splitlines()[-1:])
        raise RefusedError(
            f"the server's OS user {user} cannot run the archive command {program}: "
            f"exit status {result.returncode}{': ' + detail if detail else ''}",
            hint=f"run `runuser -u {user} -- {program} --help` to see why, fix it, then run "
            "wal-setup again",
        )
    return f"{user} can run {program}"


def _shebang_interpreter(program: Path) -> Path | None:
    try:
        with program.open("rb") as handle:
            first = handle.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if not words or words[0].endswith("/env"):
        return None
    return Path(words[0])


def _first_blocked(path: Path, test: str, prefix: list[str]) -> str | None:
    """The first folder on the way to ``path`` (and, for a symlink, to its target) that the
    user cannot search, or ``path`` itself when the user cannot read/execute it."""
    chains = [path.absolute()]
    resolved = path.resolve()
    if resolved != chains[0]:
        chains.append(resolved)
    for chain in chains:
        for folder in [*reversed(chain.parents)]:
            if not _passes(prefix, "-x", folder):
                return f"{folder} is not accessible ({_describe(folder)}; it leads to {chain})"
    what = "executable" if test == "-x" else "readable"
    target = chains[-1]
    if not _passes(prefix, test, target):
        return f"{target} is not {what} ({_describe(target)})"
    return None


def _passes(prefix: list[str], test: str, path: Path) -> bool:
    checked = subprocess.run([*prefix, "test", test, str(path)], capture_output=True, check=False)
    return checked.returncode == 0


def _describe(path: Path) -> str:
    try:
        info = path.stat()
    except OSError as exc:
        return exc.strerror or "cannot stat"
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"mode {info.st_mode & 0o7777:04o}, owner {owner}"
