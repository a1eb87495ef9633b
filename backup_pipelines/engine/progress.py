"""Progress of long steps, reported in the log at most once per interval."""

from __future__ import annotations

import time
from typing import Any

DEFAULT_PROGRESS_INTERVAL_SECONDS = 10.0


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


class Progress:
    """Logs ``done of total`` for a long step, at most once per ``interval`` seconds."""

    def __init__(self, log: Any, label: str, total: int | None, unit: str, interval: float) -> None:
        self.log = log
        self.label = label
        self.total = total or None
        self.unit = unit
        self.interval = interval
        self.done = 0
        self._last = time.monotonic()

    def _describe(self, done: int) -> str:
        if self.unit == "bytes":
            amount = _mib(done) + (f" of {_mib(self.total)}" if self.total else "")
        else:
            amount = f"{done}" + (f" of {self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            amount += f" ({min(100.0, 100.0 * done / self.total):.0f}%)"
        return amount

    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info(f"{self.label} progress: {self._describe(done)}")

    def finish(self) -> None:
        self.log.info(f"{self.label} progress: {self._describe(self.done)}, done")
