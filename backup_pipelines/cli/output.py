"""What every command shares: results on stdout (flushed, for pipes and cron), logs on stderr."""

import logging
import os
import sys

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
