"""What every command shares: results on stdout (flushed, for pipes and cron), logs on stderr."""

import logging

log = logging.getLogger("backup_pipelines")


def say(text: str = "") -> None:
    print(text, flush=True)
