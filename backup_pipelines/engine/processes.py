"""Child processes whose stderr we keep (bounded) for error messages."""

from __future__ import annotations

import collections
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO


def one_line(text: str) -> str:
    """A tool's multi-line stderr as one line for an error message (lines joined with " | ")."""
    return " | ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


class StderrCollector:
    """Drain a child's stderr in a thread, keeping the last lines for an error message."""

    def __init__(self, stream: IO[bytes], *, max_lines: int = 40) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._lines.append(raw.decode("utf-8", "replace").rstrip())
        stream.close()

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(line for line in self._lines if line)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
) -> tuple[subprocess.Popen[bytes], StderrCollector]:
    proc = subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    return proc, StderrCollector(proc.stderr)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child that is still running (after an error on our side)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
