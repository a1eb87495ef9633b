"""One progress reporter for every long operation: backups (logical and base), uploads and
downloads, restores, drills and pruning.

Engine functions take ``progress: ProgressReporter | None`` beside their ``log``; without one they
report through that ``log`` (``ProgressReporter(log)``), which is what cron, pipes and Dagster
runs (``context.log``) read: a line at most every ``interval`` seconds while a step runs, and a
summary line when it ends::

    pg_dump progress: 1.2 GiB, 41.0 MiB/s, 30s
    psql progress: 1.2 GiB of 4.8 GiB (25%), 40.2 MiB/s, ETA 1m32s
    psql progress: 4.8 GiB of 4.8 GiB (100%), done in 2m02s, 40.3 MiB/s

The command line at a terminal passes a reporter with a :class:`LiveLine` instead: the same line
redrawn in place (``\\r``) a few times a second, the final one kept, and log records printed above
it (:class:`LiveLineHandler`).
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

DEFAULT_PROGRESS_INTERVAL_SECONDS = 10.0
# How often the live terminal line is redrawn: smooth enough to watch, cheap enough not to matter.
LIVE_REDRAW_SECONDS = 0.25

logger = logging.getLogger("backup_pipelines")

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_amount(value: float, unit: str) -> str:
    """``12.3 MiB`` for bytes, ``12 items`` for anything else."""
    if unit != "bytes":
        return f"{value:.0f} {unit}"
    if value < 1024:
        return f"{value:.0f} B"
    exponent = min(int(math.log(value, 1024)), len(_BYTE_UNITS) - 1)
    return f"{value / 1024**exponent:.1f} {_BYTE_UNITS[exponent]}"


def format_rate(per_second: float, unit: str) -> str:
    if unit != "bytes":
        return f"{per_second:.1f} {unit}/s"
    return format_amount(per_second, unit) + "/s"


def format_duration(seconds: float) -> str:
    """``0.4s``, ``42s``, ``3m05s``, ``2h07m``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """The progress of one long step. Call :meth:`advance` (or :meth:`update`) as work is done
    and :meth:`finish` at the end; used as a context manager it finishes on success and is
    abandoned (no summary line) when the step fails."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        *,
        show: Callable[[Progress, bool], None],
        clock: Callable[[], float],
    ) -> None:
        self.label = label
        self.total = total or None
        self.unit = unit
        self.done = 0
        self._show = show
        self._clock = clock
        self.started = clock()
        self.shown_at: float | None = None  # when the reporter last showed it
        self.finished = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()
        elif not self.finished:
            self.finished = True
            self._show(self, False)  # the reporter sees `finished` and takes the line down

    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def update(self, done: int) -> None:
        self.done = done
        if not self.finished:
            self._show(self, False)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._show(self, True)

    @property
    def elapsed(self) -> float:
        return max(self._clock() - self.started, 0.0)

    def rate(self) -> float | None:
        """Units per second since the step started (None until time has passed)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else None

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None when the total or the rate is unknown)."""
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(self.total - self.done, 0) / rate

    def describe(self, final: bool = False) -> str:
        if self.total is None:
            amount = format_amount(self.done, self.unit)
        else:
            share = min(100.0, 100.0 * self.done / self.total)
            if self.unit == "bytes":
                amount = (
                    f"{format_amount(self.done, 'bytes')} of {format_amount(self.total, 'bytes')}"
                )
            else:
                amount = f"{self.done} of {self.total} {self.unit}"
            amount += f" ({share:.0f}%)"
        parts = [amount]
        if final:
            parts.append(f"done in {format_duration(self.elapsed)}")
        rate = self.rate()
        if rate is not None:
            parts.append(format_rate(rate, self.unit))
        if not final:
            eta = self.eta()
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
            elif self.total is None:
                parts.append(format_duration(self.elapsed))
        return ", ".join(parts)

    def line(self, final: bool = False) -> str:
        return f"{self.label} progress: {self.describe(final)}"


class LiveLine:
    """One line of a terminal, redrawn in place; what else is written goes above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        self._text = ""

    def _fit(self, text: str) -> str:
        # A line wider than the terminal wraps, and "\r" then redraws only its last row.
        width = shutil.get_terminal_size(fallback=(120, 24)).columns
        return text if len(text) < width else text[: max(width - 2, 10)] + "…"

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def draw(self, text: str) -> None:
        with self.lock:
            self._text = self._fit(text)
            self._write("\r" + self._text + "\x1b[K")

    def keep(self, text: str) -> None:
        """Write the final line and leave it on the screen."""
        with self.lock:
            self._text = ""
            self._write("\r" + text + "\x1b[K\n")

    def remove(self) -> None:
        with self.lock:
            if self._text:
                self._text = ""
                self._write("\r\x1b[K")

    def hide(self) -> None:
        """Take the line down for a moment (a log record is about to be written)."""
        with self.lock:
            if self._text:
                self._write("\r\x1b[K")

    def show_again(self) -> None:
        with self.lock:
            if self._text:
                self._write("\r" + self._text + "\x1b[K")


class LiveLineHandler(logging.StreamHandler):
    """Writes log records to the live line's terminal above the line, which is redrawn after."""

    def __init__(self, live: LiveLine) -> None:
        super().__init__(live.stream)
        self.live = live

    def emit(self, record: logging.LogRecord) -> None:
        with self.live.lock:
            self.live.hide()
            super().emit(record)
            self.live.show_again()


class ProgressReporter:
    """Where the progress of long steps shows: ``log`` lines at most every ``interval`` seconds
    plus a summary line (the default), or one ``live`` terminal line redrawn in place."""

    def __init__(
        self,
        log: Any = None,
        *,
        interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
        live: LiveLine | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log or logger
        self.interval = interval
        self.live = live
        self.clock = clock

    def start(self, label: str, total: int | None = None, unit: str = "bytes") -> Progress:
        """A new step's progress (``total`` when known: then the lines show % and ETA)."""
        return Progress(label, total, unit, show=self._show, clock=self.clock)

    def _show(self, progress: Progress, final: bool) -> None:
        now = self.clock()
        if self.live is not None:
            if final:
                self.live.keep(progress.line(final=True))
            elif progress.finished:  # abandoned: the step failed, its error says the rest
                self.live.remove()
            elif progress.shown_at is None or now - progress.shown_at >= LIVE_REDRAW_SECONDS:
                progress.shown_at = now
                self.live.draw(progress.line())
            return
        if final:
            self.log.info(progress.line(final=True))
        elif not progress.finished:
            last = progress.started if progress.shown_at is None else progress.shown_at
            if now - last >= self.interval:
                progress.shown_at = now
                self.log.info(progress.line())


def reporter_for(
    progress: ProgressReporter | None,
    log: Any,
    interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
) -> ProgressReporter:
    """``progress`` when the caller passed one, else log lines through ``log``."""
    return progress if progress is not None else ProgressReporter(log, interval=interval)
