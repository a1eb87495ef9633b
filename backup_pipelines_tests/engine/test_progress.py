"""The progress reporter: rendering, rate and ETA against a fake monotonic clock, log lines at
most once per interval, and the live terminal line (redrawn in place, final line kept, log
records written above it)."""

from __future__ import annotations

import io
import logging

import pytest

from backup_pipelines.engine.progress import (
    LiveLine,
    LiveLineHandler,
    ProgressReporter,
    format_amount,
    format_duration,
)

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class Lines:
    """A log that keeps what it is told (the interface the engine's ``log=`` objects have)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_amounts_and_durations_read_like_a_person_would_write_them() -> None:
    assert format_amount(0, "bytes") == "0 B"
    assert format_amount(1023, "bytes") == "1023 B"
    assert format_amount(1536, "bytes") == "1.5 KiB"
    assert format_amount(48 * MIB, "bytes") == "48.0 MiB"
    assert format_amount(3 * (1 << 30), "bytes") == "3.0 GiB"
    assert format_amount(12, "items") == "12 items"
    assert format_duration(0.42) == "0.4s"
    assert format_duration(42) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7620) == "2h07m"


def test_rate_and_eta_come_from_the_clock_and_the_total() -> None:
    clock, log = FakeClock(), Lines()
    reporter = ProgressReporter(log, interval=10, clock=clock)
    progress = reporter.start("psql", total=100 * MIB)
    clock.tick(5)
    progress.advance(20 * MIB)
    assert progress.rate() == pytest.approx(4 * MIB)
    assert progress.eta() == pytest.approx(20)
    assert progress.line() == "psql progress: 20.0 MiB of 100.0 MiB (20%), 4.0 MiB/s, ETA 20s"
    clock.tick(15)
    progress.advance(80 * MIB)
    progress.finish()
    assert log.lines[-1] == ("psql progress: 100.0 MiB of 100.0 MiB (100%), done in 20s, 5.0 MiB/s")


def test_unknown_total_shows_amount_rate_and_elapsed_time() -> None:
    clock, log = FakeClock(), Lines()
    progress = ProgressReporter(log, clock=clock).start("pg_dump")
    clock.tick(4)
    progress.advance(10 * MIB)
    assert progress.eta() is None
    assert progress.line() == "pg_dump progress: 10.0 MiB, 2.5 MiB/s, 4.0s"
    items = ProgressReporter(log, clock=clock).start("Pruning 'prod'", total=4, unit="backups")
    clock.tick(2)
    items.advance(1)
    assert items.line() == "Pruning 'prod' progress: 1 of 4 backups (25%), 0.5 backups/s, ETA 6.0s"


def test_log_lines_come_at_most_once_per_interval_and_end_with_a_summary() -> None:
    clock, log = FakeClock(), Lines()
    progress = ProgressReporter(log, interval=10, clock=clock).start("Download of s3://b/x", 60)
    for _ in range(60):  # one unit a second for a minute
        clock.tick(1)
        progress.advance(1)
    progress.finish()
    progress.finish()  # finishing twice says it once
    assert len(log.lines) == 7  # at 10, 20, ... 60 s, then the summary
    assert log.lines[0].startswith("Download of s3://b/x progress: 10 B of 60 B (17%)")
    assert log.lines[-1].endswith("done in 1m00s, 1 B/s")
    assert all("\r" not in line for line in log.lines)


def test_a_failed_step_logs_no_summary() -> None:
    clock, log = FakeClock(), Lines()
    with pytest.raises(RuntimeError), ProgressReporter(log, clock=clock).start("psql") as progress:
        progress.advance(5)
        raise RuntimeError("psql died")
    progress.advance(5)
    assert log.lines == []


def test_live_line_redraws_in_place_keeps_the_final_line_and_lets_logs_through() -> None:
    clock, terminal = FakeClock(), io.StringIO()
    live = LiveLine(terminal)
    logger = logging.getLogger("test_progress_live")
    logger.propagate = False
    handler = LiveLineHandler(live)
    logger.addHandler(handler)
    try:
        reporter = ProgressReporter(logger, interval=10, live=live, clock=clock)
        with reporter.start("pg_dump") as progress:
            for _ in range(8):
                clock.tick(0.1)
                progress.advance(MIB)
            logger.warning("pg_dump said: something worth knowing")
            clock.tick(0.2)
            progress.advance(MIB)
    finally:
        logger.removeHandler(handler)
    output = terminal.getvalue()
    assert output.count("\rpg_dump progress: ") >= 4  # redrawn, not one line per update
    assert output.count("\n") == 2  # the log record and the final line, nothing else
    warning_at = output.index("pg_dump said: something worth knowing\n")
    assert output[warning_at - 4 : warning_at] == "\r\x1b[K"  # the live line was taken down first
    assert output.endswith("\rpg_dump progress: 9.0 MiB, done in 1.0s, 9.0 MiB/s\x1b[K\n")


def test_live_line_of_a_failed_step_is_taken_down() -> None:
    clock, terminal = FakeClock(), io.StringIO()
    reporter = ProgressReporter(Lines(), live=LiveLine(terminal), clock=clock)
    with pytest.raises(OSError), reporter.start("Upload of x", total=10) as progress:
        clock.tick(1)
        progress.advance(3)
        raise OSError("network down")
    assert terminal.getvalue().endswith("\r\x1b[K")
    assert "done" not in terminal.getvalue()
