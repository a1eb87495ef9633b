"""What every command shares: results on stdout (flushed, for pipes and cron), logs on stderr,
progress (a live line at a terminal, periodic log lines otherwise), and the targets file as
commands read it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from backup_pipelines.engine.progress import (
    DEFAULT_PROGRESS_INTERVAL_SECONDS,
    LiveLine,
    ProgressReporter,
)

if TYPE_CHECKING:
    from backup_pipelines.engine.config import ProjectConfig

log = logging.getLogger("backup_pipelines")

# The live progress line on stderr, when stderr is a terminal (set up with the logging).
_live_line: LiveLine | None = None


def use_live_line(live: LiveLine | None) -> None:
    global _live_line
    _live_line = live


def progress_for(args: argparse.Namespace) -> ProgressReporter:
    """Where a command's long steps report: the live line at a terminal, else log lines every
    ``--progress-interval`` seconds (cron, pipes, log files)."""
    interval = getattr(args, "progress_interval", DEFAULT_PROGRESS_INTERVAL_SECONDS)
    return ProgressReporter(log, interval=interval, live=_live_line)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 to 86400)")
    return value


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress-interval",
        type=_seconds,
        default=DEFAULT_PROGRESS_INTERVAL_SECONDS,
        metavar="SECONDS",
        help="how often long steps log their progress when stderr is not a terminal "
        "(default %(default)s; at a terminal one live line shows it)",
    )


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
    # Imported here, not at start-up: `--help` and argument errors need no pydantic or YAML.
    from backup_pipelines.engine.config import load_config

    config = load_config(path, isolate_targets=True)
    for name, problems in config.broken_targets.items():
        log.warning(
            f"target '{name}' is skipped, its settings are invalid: "
            + "; ".join(problems.splitlines())
        )
    return config
