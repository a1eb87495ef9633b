"""Asynchronous archiving: the spool folder shared by the per-segment commands and the worker.

With ``pitr.async_archive`` PostgreSQL's ``archive_command`` / ``restore_command`` carry
``--spool-dir``; each call then only looks at a status file here and, when the answer is not
there yet, starts (or waits for) the background worker (``worker.py``), which does the real
work through the same ``wal_push`` / ``wal_fetch`` code as the synchronous commands::

    <spool>/worker.lock                 flock held by the running worker; holds its pid
    <spool>/worker.log                  the worker's log
    <spool>/push/<name>.request         wal-push asks for <name> (the path, size, mtime, inode)
    <spool>/push/<name>.ok              <name> is stored in every configured place
    <spool>/push/<name>.error           the worker's failure for <name> (reported once)
    <spool>/fetch/<key>/<name>.want     wal-fetch asks for <name> (key: the recovering data dir)
    <spool>/fetch/<key>/<name>          a segment fetched and verified ahead of recovery
    <spool>/fetch/<key>/<name>.ok       its size and SHA-256 (written after it: the commit point)
    <spool>/fetch/<key>/<name>.missing  not in the archive (answer to a .want, reported once)
    <spool>/fetch/<key>/<name>.error    every copy failed (the command then fetches directly)

``.ok`` of a push also records the file's size, mtime and inode: a status left from another
file of the same name is never taken as an answer. Status files are renamed into place but not
fsynced: each only reports a fact made durable elsewhere (the archive), and one lost in a crash
just means the segment is pushed again (identical content is accepted again).

This module runs in every per-segment call, so it imports nothing beyond a few standard
modules (see the README's Performance section for the measured cost).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

PUSH = "push"
FETCH = "fetch"
LOCK_NAME = "worker.lock"
LOG_NAME = "worker.log"
REQUEST = ".request"
WANT = ".want"
OK = ".ok"
ERROR = ".error"
MISSING = ".missing"
TMP = ".tmp"

# How long a call waits for the worker's answer while the worker is alive (PostgreSQL retries a
# failed archive_command, so giving up is safe; a recovery falls back to a direct fetch).
PUSH_WAIT_SECONDS = 600.0
FETCH_WAIT_SECONDS = 120.0
# A worker that dies without answering (killed, out of memory) is replaced this many times per
# call before the call gives up.
RESPAWNS = 3
_LIVENESS_EVERY = 0.1


def private_mkdir(path: str) -> None:
    """The spool and its subfolders, 0700, never their parents. ``ensure_private_dir`` (the
    tool's one way to make folders) would cost this per-segment path its imports; ``wal-setup``
    makes ``spool_dir`` through it."""
    try:  # noqa: SIM105 - contextlib would cost an import on every call
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


_NUMBERS = {"size", "mtime_ns", "inode"}


def write_status(path: str, data: dict[str, object]) -> None:
    """Put a status (or request) file in place atomically: it is complete or absent. One
    ``key=value`` a line (json would import re, enum, ... on every call)."""
    text = "".join(f"{key}={' '.join(str(value).split())}\n" for key, value in data.items())
    tmp = f"{path}.{os.getpid()}{TMP}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def read_status(path: str) -> dict[str, object] | None:
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    status: dict[str, object] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        status[key] = int(value) if key in _NUMBERS and value.isdigit() else value
    return status


def remove(path: str) -> None:
    try:  # noqa: SIM105 - contextlib would cost an import on every call
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_identity(info: os.stat_result) -> dict[str, int]:
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}


def same_file(status: dict[str, object], info: os.stat_result) -> bool:
    return all(status.get(key) == value for key, value in file_identity(info).items())


def worker_running(spool: str) -> bool:
    """Whether a worker holds the spool's lock (a killed worker releases it at once)."""
    try:
        fd = os.open(os.path.join(spool, LOCK_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def worker_pid(spool: str) -> int | None:
    """The pid of the running worker, if one runs."""
    if not worker_running(spool):
        return None
    try:
        with open(os.path.join(spool, LOCK_NAME)) as handle:
            return int(handle.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def start_worker(spool: str, command: list[str]) -> int:
    """Start ``command`` (the worker) in its own session, stdin from /dev/null, output to
    ``worker.log``, no inherited descriptors; returns its pid. The caller does not wait for it
    to finish (once the caller exits, init adopts it)."""
    log_path = os.path.join(spool, LOG_NAME)
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 65536)
        os.execv(command[0], command)
    finally:
        os._exit(127)


class Waiter:
    """Polls for the worker's answer: short sleeps at first, and a worker that died without
    answering is replaced (at most :data:`RESPAWNS` times)."""

    def __init__(self, spool: str, command: list[str], limit: float) -> None:
        self.spool = spool
        self.command = command
        self.deadline = time.monotonic() + limit
        self.respawns = 0
        self.delay = 0.002
        self.next_check = 0.0
        self.child: int | None = None

    def _child_running(self) -> bool:
        """A worker this call started and that has not exited (it may still be starting)."""
        if self.child is None:
            return False
        try:
            pid, _ = os.waitpid(self.child, os.WNOHANG)
        except ChildProcessError:
            pid = self.child
        if pid == 0:
            return True
        self.child = None
        return False

    def tick(self) -> str | None:
        """Sleep a little; returns a reason to stop waiting, or None to keep waiting."""
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + _LIVENESS_EVERY
            if not self._child_running() and not worker_running(self.spool):
                if self.respawns >= RESPAWNS:
                    return (
                        f"the async worker stopped {RESPAWNS} times without an answer (see "
                        f"{os.path.join(self.spool, LOG_NAME)}; is the spool's disk full?)"
                    )
                self.respawns += 1
                self.child = start_worker(self.spool, self.command)
        if now >= self.deadline:
            return "the async worker gave no answer in time (see its log in the spool)"
        time.sleep(self.delay)
        self.delay = min(self.delay * 1.5, 0.02)
        return None


def push(spool: str, path: str, name: str, command: list[str]) -> tuple[int, str]:
    """``wal-push`` in async mode: (exit status, message). 0 only with the worker's ``.ok`` for
    this very file; a stale answer about another file of the same name is discarded."""
    source = os.path.abspath(path)
    try:
        info = os.stat(source)
    except OSError as exc:
        return 1, f"{source} cannot be read ({exc.strerror}); pass %p unchanged"
    if not os.path.isfile(source):
        return 1, f"{source} is not a file; pass %p unchanged"
    folder = os.path.join(spool, PUSH)
    base = os.path.join(folder, name)
    try:
        private_mkdir(spool)
        private_mkdir(folder)
        answer = _push_answer(base, info)
        if answer is not None:
            return answer
        write_status(base + REQUEST, {"path": source, **file_identity(info)})
    except OSError as exc:
        return (
            1,
            f"the spool {spool} cannot be used: {exc.strerror or exc} (not reported archived; PostgreSQL retries)",
        )
    waiter = Waiter(spool, command, PUSH_WAIT_SECONDS)
    while True:
        try:
            answer = _push_answer(base, info)
        except OSError as exc:
            return 1, f"the spool {spool} cannot be used: {exc.strerror or exc}"
        if answer is not None:
            return answer
        problem = waiter.tick()
        if problem:
            return 1, f"{name} was not archived: {problem}"


def _push_answer(base: str, info: os.stat_result) -> tuple[int, str] | None:
    ok = read_status(base + OK)
    if ok is not None:
        remove(base + OK)
        if same_file(ok, info):
            where = ok.get("stored") or ok.get("already")
            return 0, f"{os.path.basename(base)} is stored in {where}"
    error = read_status(base + ERROR)
    if error is not None:
        remove(base + ERROR)
        if same_file(error, info) or "size" not in error:
            return 1, str(error.get("message") or "the async worker failed")
    return None


def fetch_queue(spool: str, data_dir: str) -> str:
    """The prefetch folder of one recovering data directory (a drill and a restore on the same
    machine never share prefetched files)."""
    import hashlib

    key = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:16]
    return os.path.join(spool, FETCH, key)


DIRECT = "direct"


def fetch(spool: str, name: str, destination: str, command: list[str]) -> tuple[int, str] | None:
    """``wal-fetch`` in async mode: (exit status, message), or None when the caller must fetch
    directly (the worker failed or the spool is unusable: recovery never depends on it)."""
    queue = fetch_queue(spool, os.getcwd())
    base = os.path.join(queue, name)
    try:
        private_mkdir(spool)
        private_mkdir(os.path.join(spool, FETCH))
        private_mkdir(queue)
        if os.path.exists(base + OK):
            answer = _fetch_answer(base, destination)
        else:
            answer = None
            # Answers to an earlier call that gave up are no answer to this one.
            remove(base + MISSING)
            remove(base + ERROR)
        if answer is None:
            write_status(base + WANT, {"name": name})
            waiter = Waiter(spool, command, FETCH_WAIT_SECONDS)
        while answer is None:
            if waiter.tick():
                remove(base + WANT)
                return None
            answer = _fetch_answer(base, destination)
    except OSError:
        return None
    return None if answer == DIRECT else answer  # type: ignore[return-value]


def _fetch_answer(base: str, destination: str) -> tuple[int, str] | str | None:
    name = os.path.basename(base)
    ok = read_status(base + OK)
    if ok is not None:
        try:
            handed = hand_over(base, destination, ok)
        finally:
            remove(base)
            remove(base + OK)
        if handed:
            return 0, f"restored {name} ({ok.get('size')} bytes, prefetched and verified)"
        return DIRECT
    missing = read_status(base + MISSING)
    if missing is not None:
        remove(base + MISSING)
        return 1, str(missing.get("message") or f"{name} is not in the WAL archive")
    if os.path.exists(base + ERROR):
        remove(base + ERROR)
        return DIRECT
    return None


def hand_over(source: str, destination: str, ok: dict[str, object]) -> bool:
    """Move a prefetched file to ``destination`` once its SHA-256 matches the worker's record
    (read while copying when the spool is on another filesystem). False: it did not match."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    target_dir = os.path.dirname(os.path.abspath(destination))
    same_fs = os.stat(source).st_dev == os.stat(target_dir).st_dev
    tmp = destination + ".bp-fetch"
    out = None if same_fs else os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    placed = False
    try:
        with open(source, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
        if digest.hexdigest() != ok.get("sha256") or size != ok.get("size"):
            print(
                f"wal-fetch: the prefetched copy of {os.path.basename(source)} does not match "
                "its checksum; fetching it directly",
                file=sys.stderr,
            )
            return False
        if out is not None:
            os.close(out)
            out = None
        os.replace(source if same_fs else tmp, destination)
        placed = True
        return True
    finally:
        if out is not None:
            os.close(out)
        if not same_fs and not placed:
            remove(tmp)
