"""What every command shares: results on stdout (flushed, for pipes and cron), logs on stderr,
and the targets file as commands read it."""

import logging

from backup_pipelines.engine.config import ProjectConfig, load_config

log = logging.getLogger("backup_pipelines")


def say(text: str = "") -> None:
    print(text, flush=True)


def load_project(path: str | None) -> ProjectConfig:
    """The targets file for a command. A target whose own settings are invalid stops only the
    commands that use it (they exit 2 with its problems); the others run, with a warning."""
    config = load_config(path, isolate_targets=True)
    for name, problems in config.broken_targets.items():
        log.warning(
            f"target '{name}' is skipped, its settings are invalid: "
            + "; ".join(problems.splitlines())
        )
    return config
