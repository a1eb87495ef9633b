"""How PostgreSQL calls us: ``archive_command`` / ``restore_command``, the postgresql.conf
lines, and the archive folder owned by the server's OS user."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.fsutil import ensure_private_dir
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
    path: Path, server_os_user: str, *, what: str = "WAL archive folder (pitr.archive_dir)"
) -> Path:
    """Create the local archive folder (or the async spool: ``what``) 0700, owned by the
    server's OS user.

    A folder that already exists keeps its owner and mode (someone chose them); it is only
    checked: a warning says when the server's OS user apparently cannot write it.
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
    ensure_private_dir(path, what=what, parent_mode=0o711)
    if entry is not None and existed:
        if not _writable_by(path, entry):
            logger.warning(
                f"{what}: {path} exists and {server_os_user} apparently cannot write "
                f"it: archiving will fail until you run `chown {server_os_user}: {path}` (its "
                "owner and mode were left as they are)"
            )
    elif entry is not None:
        os.chown(path, entry.pw_uid, entry.pw_gid)
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
