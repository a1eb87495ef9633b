"""The asynchronous archiving worker: pushes finished WAL ahead of PostgreSQL's calls and
prefetches segments ahead of recovery, answering through the spool (layout in ``spool.py``).

Started by a ``wal-push`` / ``wal-fetch`` call in async mode when none runs (one per spool,
held by an flock), it works until nothing has been asked for ``idle_seconds``, then exits; the
next call starts another. Every segment goes through the same :func:`wal_push` /
:func:`wal_fetch` as the synchronous commands, so "stored in every place" and "both checksums
verified" mean exactly what they mean there; ``.ok`` is written only after they returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.wal import spool as sp
from backup_pipelines.engine.wal.archive import WalArchive
from backup_pipelines.engine.wal.errors import WalError, WalNotFoundError
from backup_pipelines.engine.wal.fetch import wal_fetch
from backup_pipelines.engine.wal.names import (
    DEFAULT_SEGMENT_SIZE,
    segment_name,
    segment_number,
    timeline_of,
    wal_kind,
)
from backup_pipelines.engine.wal.push import wal_push

logger = logging.getLogger("backup_pipelines")

IDLE_SECONDS = 10.0
# A segment recovery has not asked for yet and that was not in the archive is looked for again
# after this long (the archive may still be growing).
_MISSING_RETRY_SECONDS = 1.0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, BackupPipelinesError):
        return exc.one_line()
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Queue:
    """What the worker knows about one recovering data directory's prefetch folder."""

    folder: Path
    position: str | None = None
    segment_size: int = DEFAULT_SEGMENT_SIZE
    missing: dict[str, float] = field(default_factory=dict)


class AsyncWorker:
    def __init__(
        self,
        archive: WalArchive,
        spool: Path,
        *,
        workers: int,
        prefetch: int,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.archive = archive
        self.spool = spool
        self.push_dir = spool / sp.PUSH
        self.fetch_dir = spool / sp.FETCH
        self.workers = workers
        self.prefetch = prefetch
        self.idle_seconds = idle_seconds
        self.inflight: dict[tuple[str, str], Future[None]] = {}
        # Pushed by this worker: not pushed again from archive_status before PostgreSQL marks
        # them done (an explicit request still is).
        self.pushed: set[str] = set()
        self.failed: set[str] = set()
        self.wal_dirs: set[Path] = set()
        self.queues: dict[Path, _Queue] = {}
        self.fatal: str | None = None

    def run(self) -> bool:
        """Serve the spool until idle. False when another worker already serves it. Raises
        WalError when the spool cannot take the answers."""
        sp.private_mkdir(str(self.spool))
        fd = os.open(self.spool / sp.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            sp.private_mkdir(str(self.push_dir))
            sp.private_mkdir(str(self.fetch_dir))
            logger.info(
                f"async WAL worker {os.getpid()} serving {self.spool} for {self.archive.describe()} "
                f"({self.workers} in parallel, prefetch {self.prefetch})"
            )
            self._serve()
            if self.fatal:
                raise WalError(
                    f"the async WAL worker stops: {self.fatal}",
                    hint=f"free space in {self.spool} (wal-push fails until then; nothing is "
                    "reported archived that was not stored)",
                )
            self._tidy_prefetched()
            logger.info(f"async WAL worker {os.getpid()}: idle for {self.idle_seconds:g}s, exiting")
            return True
        finally:
            os.close(fd)  # releases the lock

    def _serve(self) -> None:
        last_work = time.monotonic()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="wal-async") as pool:
            while True:
                for key, job in self._jobs():
                    if key in self.inflight:
                        continue
                    if len(self.inflight) >= self.workers * 2:
                        break
                    self.inflight[key] = pool.submit(job)
                for key, future in list(self.inflight.items()):
                    if future.done():
                        del self.inflight[key]
                        if future.exception() is not None:
                            logger.error(f"async WAL worker: {_one_line(future.exception())}")  # type: ignore[arg-type]
                if self.fatal:
                    return
                now = time.monotonic()
                if self.inflight:
                    last_work = now
                elif now - last_work > self.idle_seconds:
                    return
                time.sleep(0.005 if now - last_work < 1 else 0.05)

    # -- what to do next, most urgent first -----------------------------------------------

    def _jobs(self) -> list[tuple[tuple[str, str], Callable[[], None]]]:
        jobs: list[tuple[tuple[str, str], Callable[[], None]]] = []
        ahead: list[tuple[tuple[str, str], Callable[[], None]]] = []
        for entry in _scan(self.push_dir):
            if not entry.endswith(sp.REQUEST):
                continue
            name = entry[: -len(sp.REQUEST)]
            request = sp.read_status(str(self.push_dir / entry))
            if request is None or "path" not in request:
                continue
            source = Path(str(request["path"]))
            self.wal_dirs.add(source.parent)
            jobs.append((("push", name), self._push_job(name, source, request)))
        for folder in [self.fetch_dir / d for d in _scan(self.fetch_dir)]:
            queue = self.queues.setdefault(folder, _Queue(folder))
            for entry in _scan(folder):
                if entry.endswith(sp.WANT):
                    name = entry[: -len(sp.WANT)]
                    if not _answered(folder / name):
                        jobs.append(((str(folder), name), self._fetch_job(queue, name)))
                        self._moved_to(queue, name)
            ahead += self._prefetch_jobs(queue)
        for wal_dir in self.wal_dirs:
            for name in _ready(wal_dir):
                if name in self.pushed or name in self.failed or _answered(self.push_dir / name):
                    continue
                ahead.append((("push", name), self._push_job(name, wal_dir / name, None)))
        return jobs + ahead

    def _moved_to(self, queue: _Queue, name: str) -> None:
        """Recovery asked for ``name``: drop prefetched segments it has passed."""
        if wal_kind(name) != "segment":
            return
        queue.position = name
        here = segment_number(name, queue.segment_size)
        for entry in _scan(queue.folder):
            other = entry.split(".", 1)[0]
            with contextlib.suppress(WalError):
                if (
                    wal_kind(other) == "segment"
                    and segment_number(other, queue.segment_size) < here
                    and not entry.endswith(sp.WANT)
                ):
                    sp.remove(str(queue.folder / entry))

    def _prefetch_jobs(self, queue: _Queue) -> list[tuple[tuple[str, str], Callable[[], None]]]:
        if queue.position is None or not self.prefetch:
            return []
        timeline = timeline_of(queue.position)
        start = segment_number(queue.position, queue.segment_size)
        jobs = []
        now = time.monotonic()
        for step in range(1, self.prefetch + 1):
            name = segment_name(timeline, start + step, queue.segment_size)
            if _answered(queue.folder / name) or now - queue.missing.get(name, -1e9) < (
                _MISSING_RETRY_SECONDS
            ):
                continue
            jobs.append(((str(queue.folder), name), self._fetch_job(queue, name)))
        return jobs

    # -- the work itself --------------------------------------------------------------------

    def _push_job(
        self, name: str, source: Path, request: dict[str, object] | None
    ) -> Callable[[], None]:
        def job() -> None:
            base = str(self.push_dir / name)
            identity: dict[str, int] = {}
            try:
                info = source.stat()
                identity = sp.file_identity(info)
                if request is not None and not sp.same_file(request, info):
                    raise WalError(
                        f"{source} changed after wal-push asked for it (PostgreSQL retries)"
                    )
                outcome = wal_push(self.archive, source, name)
            except BaseException as exc:
                self.failed.add(name)
                message = f"wal-push FAILED for {name}: {_one_line(exc)}"
                logger.error(message)
                answer_to = (
                    {k: request[k] for k in identity if k in request} if request else identity
                )
                self._answer(base + sp.ERROR, {"message": message, **answer_to})
            else:
                self.pushed.add(name)
                self.failed.discard(name)
                self._answer(
                    base + sp.OK,
                    {
                        "stored": ", ".join(outcome.stored),
                        "already": ", ".join(outcome.already_archived),
                        **identity,
                    },
                )
                already = ", ".join(outcome.already_archived)
                logger.info(
                    f"archived {name} ({outcome.original_size} -> {outcome.size} bytes) to "
                    f"{', '.join(outcome.stored) or 'no new place'}"
                    + (f"; already identical in {already}" if already else "")
                )
            sp.remove(base + sp.REQUEST)

        return job

    def _answer(self, path: str, status: dict[str, object]) -> None:
        """Write a status; a spool that cannot take one stops the worker (its callers then say
        so and exit non-zero) instead of working on without anyone learning the results."""
        try:
            sp.write_status(path, status)
        except OSError as exc:
            self.fatal = f"cannot write {path}: {_one_line(exc)}"
            raise

    def _fetch_job(self, queue: _Queue, name: str) -> Callable[[], None]:
        def job() -> None:
            target = queue.folder / name
            try:
                outcome = wal_fetch(self.archive, name, target)
                sha256 = _sha256(target)
                if wal_kind(name) == "segment":
                    queue.segment_size = outcome.size
                self._answer(str(target) + sp.OK, {"size": outcome.size, "sha256": sha256})
            except WalNotFoundError as exc:
                queue.missing[name] = time.monotonic()
                if (queue.folder / (name + sp.WANT)).exists():
                    self._answer(str(target) + sp.MISSING, {"message": exc.message})
            except BaseException as exc:
                sp.remove(str(target))
                logger.error(f"wal-fetch of {name} failed: {_one_line(exc)}")
                if (queue.folder / (name + sp.WANT)).exists():
                    self._answer(str(target) + sp.ERROR, {"message": _one_line(exc)})
            sp.remove(str(target) + sp.WANT)

        return job

    def _tidy_prefetched(self) -> None:
        """Segments prefetched past where recovery stopped are not kept (16 MiB each)."""
        for folder in [self.fetch_dir / d for d in _scan(self.fetch_dir)]:
            if any(e.endswith(sp.WANT) for e in _scan(folder)):
                continue
            shutil.rmtree(folder, ignore_errors=True)


def _scan(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def _answered(base: Path) -> bool:
    return any(os.path.exists(str(base) + suffix) for suffix in (sp.OK, sp.ERROR, sp.MISSING))


def _ready(wal_dir: Path) -> list[str]:
    """Files PostgreSQL has finished and not archived yet (history files first)."""
    names = [
        entry[: -len(".ready")]
        for entry in _scan(wal_dir / "archive_status")
        if entry.endswith(".ready")
    ]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))
