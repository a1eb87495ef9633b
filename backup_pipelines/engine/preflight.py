"""What `backup-pipelines check-config` checks beyond the file itself: everything the next
backup, restore or WAL push would otherwise only find out when it runs.

Each check returns problems as lines (``target 'x': ...``); nothing is created or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.encryption import prepare_encryption
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.fsutil import folder_problem
from backup_pipelines.engine.postgres import find_tools

CLIENT_TOOLS = ("pg_dump", "psql", "pg_restore")


def project_problems(config: ProjectConfig) -> list[str]:
    """Every problem of the targets file and of this host, one line each."""
    problems = [line for text in config.broken_targets.values() for line in text.splitlines()]
    root_problem = folder_problem(config.resolved_backup_root, "backup_root")
    if root_problem:
        problems.append(root_problem)
    if config.metrics.textfile:
        problem = folder_problem(config.metrics.textfile.parent, "metrics.textfile folder")
        if problem:
            problems.append(problem)
    for target in config.all_targets():
        problems += target_problems(target, root_problem)
    return problems


def target_problems(target: Target, root_problem: str | None = None) -> list[str]:
    """One target's problems, each line naming the target."""
    settings = target.settings
    problems = []
    for field, read in (("dsn_env", target.dsn), ("scratch_dsn_env", target.scratch_dsn)):
        if field == "scratch_dsn_env" and not settings.scratch_dsn_env:
            continue
        try:
            source = f"target '{target.name}', field '{field}' ({getattr(settings, field)})"
            ConnectionInfo.parse(read(), source=source)
        except BackupPipelinesError as exc:
            problems.append(exc.message)
    return problems + [f"target '{target.name}': {p}" for p in _host_problems(target, root_problem)]


def _host_problems(target: Target, root_problem: str | None) -> list[str]:
    settings = target.settings
    problems = []
    try:
        # A configured key that cannot be loaded would stop the next backup.
        prepare_encryption(settings.encryption)
    except BackupPipelinesError as exc:
        problems.append(exc.message)
    problems += tool_problems(settings.pg_bin_dir)
    if not root_problem and target.backup_dir.exists():
        folder = folder_problem(target.backup_dir, "backup folder")
        if folder:
            problems.append(folder)
    if target.migrations_folder is not None and not target.migrations_folder.is_dir():
        problems.append(f"migrations.folder {target.migrations_folder} does not exist")
    if settings.pitr and settings.pitr.archive_dir and not settings.pitr.archive_dir.is_dir():
        problems.append(
            f"pitr.archive_dir {settings.pitr.archive_dir} does not exist "
            f"(create it with `backup-pipelines wal-setup {target.name}`)"
        )
    return problems


def tool_problems(pg_bin_dir: Path | None) -> list[str]:
    """pg_dump, psql and pg_restore must be found (in ``pg_bin_dir`` when it is set)."""
    if pg_bin_dir is not None and not pg_bin_dir.is_dir():
        return [f"pg_bin_dir {pg_bin_dir} does not exist (or is not a folder)"]
    tools = find_tools(None, pg_bin_dir)
    problems = []
    for tool in CLIENT_TOOLS:
        try:
            path = tools.path(tool)
        except BackupPipelinesError as exc:
            problems.append(exc.message)
            continue
        if not os.access(path, os.X_OK) or not Path(path).is_file():
            problems.append(f"{path} is not an executable file")
    return problems
