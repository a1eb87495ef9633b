"""What every command shares: results on stdout (flushed, for pipes and cron), logs on stderr,
and the targets file as commands read it."""

import logging
import os
import sys

from backup_pipelines.engine.config import ProjectConfig, load_config

log = logging.getLogger("backup_pipelines")


def say(text: str = "") -> None:
    """Print one line of results. When the reader went away (``backup-pipelines list t | head``)
    the rest of the output is dropped and the command carries on: a closed pipe must never
    interrupt a backup, a verification or a prune half-way."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Send whatever is still written to stdout to /dev/null (the pipe's reader is gone), so
    neither later output nor the interpreter's final flush raises BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


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
