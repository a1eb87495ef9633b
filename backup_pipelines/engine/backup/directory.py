"""The directory format (``pg_dump -Fd -j N``) as one backup artifact, and reading it back.

pg_dump's parallel workers write a folder: ``toc.dat`` (the table of contents, the custom
archive's layout) and one data file per table (``<dump id>.dat``, ``.dat.gz`` when pg_dump
compresses), plus large objects (``blobs.toc``, ``blob_<oid>.dat``). The backup writes that folder
into a private work folder, then streams a tar of it (``toc.dat`` first, files at top level)
through the same stages as every other backup (compression, encryption, SHA-256, ``.partial``,
rename): a partly written folder is never published. While tarring, each data file is read once
more to count its rows exactly (its COPY lines), mapped to tables through ``toc.dat``.

Verification and restore read the artifact as a tar stream: verification decodes every member
(every data file fully), restore extracts it safely and runs ``pg_restore -j`` on the folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import shutil
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from backup_pipelines.engine.backup.counting import CustomArchiveCounter, _Malformed, _NeedMore
from backup_pipelines.engine.compression import CHUNK_SIZE, read_chunks
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.fsutil import ensure_private_dir, open_private
from backup_pipelines.engine.progress import ProgressReporter

__all__ = [
    "TOC_NAME",
    "DirectoryRowCounter",
    "DirectoryToc",
    "DumpDirectoryReport",
    "folder_size",
    "read_dump_directory",
    "remove_stale_work_folders",
    "wait_for_dump_folder",
    "work_folder",
    "write_directory_tar",
]

TOC_NAME = "toc.dat"
WORK_SUBDIR = ".work"
_WORK_SUFFIX = ".d"
_ARCH_DIRECTORY = 3  # the format byte of a directory dump's toc.dat, as pg_dump writes it
_GZIP_WBITS = 31
# pg_dump ends every table's COPY data with "\\.\n" and two blank lines: three newlines no row.
_COPY_END = b"\\.\n\n\n"
# The data files pg_dump's directory format writes (with gzip: the same names plus ``.gz``).
_DATA_FILE = re.compile(r"^(?:\d+|blob_\d+)\.dat(?:\.gz)?$")
# The lists of large objects ("<oid> blob_<oid>.dat" per line): one, or one per TOC entry.
_BLOBS_TOC = re.compile(r"^blobs(?:_\d+)?\.toc$")
# What a member of our tar may be called: a plain name, no folder, no leading dot.
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9]+)*$")


def work_folder(backup_dir: Path, final: Path) -> Path:
    """The private folder pg_dump writes into for the backup that will be named ``final``:
    ``<backup_dir>/.work/<final name>.d`` (listings, retention and offsite copies look only at
    data file names in ``backup_dir``, so nothing in it is ever taken for a backup)."""
    parent = ensure_private_dir(backup_dir / WORK_SUBDIR, what="backup work folder")
    return parent / (final.name + _WORK_SUFFIX)


def remove_stale_work_folders(backup_dir: Path, *, log: Any = None) -> list[Path]:
    """Remove the pg_dump folders of backups that were killed. Only called under the target's
    backup lock, so no running backup of this target owns one."""
    parent = backup_dir / WORK_SUBDIR
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if entry.name.endswith(_WORK_SUFFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            if log is not None:
                log.warning(f"Removed {entry}: the dump folder of an interrupted backup")
    return removed


def folder_size(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(entry.stat(follow_symlinks=False).st_size for entry in entries)


def wait_for_dump_folder(
    proc: subprocess.Popen[bytes],
    folder: Path,
    progress: ProgressReporter,
    jobs: int,
    counter: DirectoryRowCounter | None = None,
) -> int:
    """Wait for pg_dump -j, reporting the bytes its folder holds so far. Meanwhile the rows of
    its table data files are counted as they are written (``counter`` takes them over when
    pg_dump succeeded), so that the counting overlaps with the dump instead of following it."""
    follower = _FolderFollower(folder) if counter is not None else None
    try:
        if follower is not None:
            follower.start()
        with progress.start(f"pg_dump -j {jobs}") as meter:
            while True:
                try:
                    returncode = proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        meter.update(folder_size(folder))
        if returncode == 0 and follower is not None and counter is not None:
            counter.adopt(follower.finish())
        return returncode
    finally:
        if follower is not None:
            follower.close()


# The files holding a table's (or a sequence's...) COPY data; large objects are not followed.
_TABLE_DATA_FILE = re.compile(r"^\d+\.dat(?:\.gz)?$")


class _FolderFollower:
    """Reads pg_dump's data files while its workers write them (they only ever append), in a
    thread of its own, feeding one :class:`_DataFileReader` per file. Each poll opens only the
    files not yet complete and reads from where it stopped, so however many tables there are,
    few files are open at a time. A file it cannot read is left to the tar pass, which counts
    what it did not."""

    _IDLE = 0.05

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._files: dict[str, _DataFileReader] = {}
        self._offsets: dict[str, int] = {}
        self._complete: set[str] = set()
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="row-counts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._poll():
                self._stop.wait(self._IDLE)

    def _poll(self) -> bool:
        try:
            names = os.listdir(self._folder)
        except OSError:
            return False  # pg_dump has not made its folder yet
        progressed = False
        for name in names:
            if name in self._complete or name in self._failed:
                continue
            if not _TABLE_DATA_FILE.match(name):
                continue
            reader = self._files.setdefault(name, _DataFileReader(name))
            try:
                with open(self._folder / name, "rb", buffering=0) as source:
                    source.seek(self._offsets.get(name, 0))
                    while chunk := source.read(CHUNK_SIZE):
                        reader.feed(chunk)
                        self._offsets[name] = self._offsets.get(name, 0) + len(chunk)
                        progressed = True
            except (OSError, IntegrityError):
                self._failed.add(name)
                del self._files[name]
                continue
            if reader.complete:
                self._complete.add(name)
        return progressed

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def finish(self) -> dict[str, _DataFileReader]:
        """Once pg_dump has exited: read what is left (of every file, the complete ones too:
        nothing may be missed), and hand over the readers."""
        self._halt()
        self._complete.clear()
        self._poll()
        return dict(self._files)

    def close(self) -> None:
        self._halt()


class DirectoryToc(CustomArchiveCounter):
    """The table of contents of a directory-format dump (``toc.dat``): the custom archive's
    header and TOC layout with the format byte of a directory and, per entry, the name of its
    data file instead of an offset. Parsed by the custom archive reader's own code."""

    _ARCHIVE_FORMAT = _ARCH_DIRECTORY
    _COMPRESSED_DATA_OK = True

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.files: dict[int, str] = {}

    def _read_extra_toc(self, buf: bytes, pos: int, dump_id: int) -> int:
        name, pos = self._str(buf, pos)
        if name:
            self.files[dump_id] = name
        return pos

    @classmethod
    def parse(cls, data: bytes, encoding: str) -> DirectoryToc:
        """Parse a whole ``toc.dat``; raises IntegrityError when it is not one."""
        toc = cls(encoding)
        try:
            pos = toc._read_head(data)
            toc._read_toc(data, pos)
        except (_NeedMore, _Malformed):
            raise IntegrityError(
                "toc.dat is not a complete table of contents of a directory-format dump"
            ) from None
        return toc

    @property
    def table_files(self) -> dict[str, str]:
        """Data file name (as listed, without ``.gz``) -> ``schema.table`` of TABLE DATA."""
        return {self.files[i]: table for i, table in self._tables.items() if i in self.files}

    @property
    def data_files(self) -> set[str]:
        """Every file the TOC names (table data, ``blobs.toc``), as listed."""
        return set(self.files.values())


class _DataFileReader:
    """Decodes one data file pushed in chunks (gunzip when it ends in ``.gz``), counting its
    newlines and keeping its last bytes: its rows are the newlines less the end marker's three."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._decoder = zlib.decompressobj(_GZIP_WBITS) if name.endswith(".gz") else None
        self.newlines = 0
        self.size = 0
        self._tail = b""

    def _take(self, data: bytes) -> None:
        if data:
            self.newlines += data.count(b"\n")
            self.size += len(data)
            self._tail = (self._tail + data[-5:])[-5:]

    def feed(self, chunk: bytes) -> None:
        if self._decoder is None:
            self._take(chunk)
            return
        try:
            while chunk:
                # Bounded output per call: a highly compressible table must not balloon memory.
                self._take(self._decoder.decompress(chunk, CHUNK_SIZE))
                if self._decoder.eof:
                    chunk = self._decoder.unused_data
                    if chunk:
                        self._decoder = zlib.decompressobj(_GZIP_WBITS)
                else:
                    chunk = self._decoder.unconsumed_tail
        except zlib.error as exc:
            raise IntegrityError(f"data file {self.name} is corrupt: {exc}") from None

    def finish(self) -> None:
        if self._decoder is not None:
            self._take(self._decoder.flush())
            if not self._decoder.eof:
                raise IntegrityError(f"data file {self.name} is truncated (gzip ends early)")

    @property
    def complete(self) -> bool:
        """The file's end has been read: gzip's end marker, or the end of the COPY data (a
        line holding only ``\\.`` appears nowhere else: COPY escapes a backslash in data)."""
        if self._decoder is not None:
            return self._decoder.eof
        return self._tail == _COPY_END

    @property
    def rows(self) -> int | None:
        """The COPY rows, or None when the data does not end as pg_dump ends table data."""
        return self.newlines - 3 if self._tail == _COPY_END else None


class DirectoryRowCounter:
    """Rows per table from the data files as they are tarred (each read once, in chunks)."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._toc: DirectoryToc | None = None
        self._rows: dict[str, int] = {}  # listed file name -> rows
        self._broken = False
        self._early: dict[str, _DataFileReader] = {}  # read while pg_dump wrote them

    def read_toc(self, data: bytes) -> None:
        try:
            self._toc = DirectoryToc.parse(data, self._encoding)
        except IntegrityError:
            self._broken = True

    def adopt(self, readers: dict[str, _DataFileReader]) -> None:
        """Files read to their end while pg_dump wrote them: not counted again."""
        self._early = dict(readers)

    def reader(self, name: str) -> _DataFileReader | None:
        """The reader to feed ``name``'s bytes to, or None: not table data, or counted."""
        if self._broken or self._toc is None:
            return None
        listed = name.removesuffix(".gz")
        if listed not in self._toc.table_files:
            return None
        early = self._early.pop(name, None)
        if early is not None:
            self.done(early)
            return None
        return _DataFileReader(name)

    def done(self, reader: _DataFileReader) -> None:
        reader.finish()
        rows = reader.rows
        if rows is None:
            self._broken = True
            return
        self._rows[reader.name.removesuffix(".gz")] = rows

    def result(self) -> dict[str, int] | None:
        """Rows per ``schema.table``; None when the folder was not what this reader knows."""
        if self._broken or self._toc is None:
            return None
        files = self._toc.table_files
        if set(files) != set(self._rows):
            return None
        return {files[name]: rows for name, rows in self._rows.items()}


def _members(folder: Path) -> list[Path]:
    files = []
    for entry in folder.iterdir():
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise IntegrityError(f"pg_dump's folder holds {entry.name}, which is not a file")
        files.append(entry)
    # toc.dat first: a reader knows the tables before it meets their data.
    return sorted(files, key=lambda path: (path.name != TOC_NAME, path.name))


def write_directory_tar(
    folder: Path,
    write: Callable[[bytes], None],
    counter: DirectoryRowCounter | None,
    advance: Callable[[int], None] | None = None,
) -> int:
    """Stream a tar of pg_dump's ``folder`` (files at top level, ``toc.dat`` first) to
    ``write`` in 1 MiB blocks; feed each table's data file to ``counter`` as it passes.
    Returns the tar's size in bytes. ``write`` runs in a thread of its own (see
    :class:`_WriterThread`); it has been called for every block when this returns."""
    names = _members(folder)
    if not names or names[0].name != TOC_NAME:
        raise IntegrityError(f"pg_dump wrote no {TOC_NAME} in {folder}")
    writer = _WriterThread(write)
    try:
        size = _write_tar(names, writer.put, counter, advance)
    except BaseException:
        writer.cancel()
        raise
    writer.close()
    return size


class _WriterThread:
    """Hands tar blocks to ``write`` (compression, encryption, SHA-256, the file: all release
    the GIL) in a thread of its own, so that they overlap with reading and counting the next
    blocks. At most ``_QUEUED`` blocks wait (memory stays flat); a failure of ``write`` is
    raised to the producer at its next block or at ``close``."""

    _QUEUED = 8

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=self._QUEUED)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="tar-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            if self._error is not None or self._cancelled:
                continue  # drain: the producer learns of the failure at its next block
            try:
                self._write(block)
            except BaseException as exc:  # raised in the producer's thread
                self._error = exc

    def put(self, block: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._blocks.put(block)

    def close(self) -> None:
        """Wait until every block is written; raise what writing raised."""
        self._blocks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop writing (the producer failed) and wait for the thread, so the stages can be
        aborted safely."""
        self._cancelled = True
        self._blocks.put(None)
        self._thread.join()


def _write_tar(
    names: list[Path],
    put: Callable[[bytes], None],
    counter: DirectoryRowCounter | None,
    advance: Callable[[int], None] | None,
) -> int:
    """The tar itself: each member's header from tarfile (``TarInfo.tobuf``, PAX), its data in
    1 MiB reads handed on as they are (tarfile's stream writer copies every block several
    times, which made it the slowest step), padding to 512 bytes, and the end of the archive
    as tarfile writes it (two zero blocks, padded to a whole record)."""
    size = 0

    def emit(block: bytes) -> None:
        nonlocal size
        put(block)
        size += len(block)

    for path in names:
        with path.open("rb", buffering=0) as handle:
            status = os.fstat(handle.fileno())
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = status.st_size, int(status.st_mtime), 0o600
            emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if path.name == TOC_NAME:
                data = handle.read()  # the TOC is small (one entry per object)
                if len(data) != info.size:
                    raise IntegrityError(f"{path} changed while it was being stored")
                if counter is not None:
                    counter.read_toc(data)
                emit(data)
                if advance is not None:
                    advance(len(data))
            else:
                reader = counter.reader(path.name) if counter is not None else None
                left = info.size
                while left:
                    chunk = handle.read(min(CHUNK_SIZE, left))
                    if not chunk:
                        raise IntegrityError(f"{path} shrank while it was being stored")
                    if reader is not None:
                        reader.feed(chunk)
                    emit(chunk)
                    left -= len(chunk)
                    if advance is not None:
                        advance(len(chunk))
                if reader is not None and counter is not None:
                    counter.done(reader)
            emit(bytes(-info.size % tarfile.BLOCKSIZE))
    emit(bytes(2 * tarfile.BLOCKSIZE))
    emit(bytes(-size % tarfile.RECORDSIZE))
    return size


@dataclass
class DumpDirectoryReport:
    """What reading a directory-format artifact found."""

    tar_bytes: int = 0
    members: list[str] = field(default_factory=list)
    data_bytes: int = 0  # decompressed bytes of every data file
    row_counts: dict[str, int] | None = None
    toc_entries: int = 0


def _tar_reader(chunks: Iterator[bytes]) -> tuple[io.BufferedReader, Callable[[], int]]:
    # base_reader imports verify, which reads this module: imported when used.
    from backup_pipelines.engine.backup.base_reader import _ChunkStream

    size = [0]

    def counted() -> Iterator[bytes]:
        for chunk in chunks:
            size[0] += len(chunk)
            yield chunk

    return io.BufferedReader(_ChunkStream(counted()), CHUNK_SIZE), lambda: size[0]


def _member_chunks(handle: IO[bytes], out: BinaryIO | None) -> Iterator[bytes]:
    for chunk in read_chunks(handle):
        if out is not None:
            out.write(chunk)
        yield chunk


def read_dump_directory(
    chunks: Iterator[bytes],
    *,
    name: str,
    encoding: str,
    extract_to: Path | None = None,
    decode_data: bool = True,
) -> DumpDirectoryReport:
    """Walk the tar of a directory-format dump (the decoded artifact): decode every data file
    fully, count each table's rows, check that every file ``toc.dat`` (and ``blobs.toc``)
    names is there. With ``extract_to`` (an existing, empty folder) the members are written
    into it as they pass; only plain files at the top level are accepted, so nothing can land
    outside it. ``decode_data=False`` (a restore, whose pg_restore decodes them anyway, after
    verification did) copies the data files without decompressing them. Raises
    IntegrityError on anything missing, truncated or corrupt."""
    report = DumpDirectoryReport()
    counter = DirectoryRowCounter(encoding)
    toc: DirectoryToc | None = None
    listed_blobs: set[str] = set()
    seen: set[str] = set()
    stream, tar_size = _tar_reader(chunks)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isfile() or not _MEMBER_NAME.match(member.name):
                    raise IntegrityError(
                        f"{name} holds {member.name!r}, which is not a file of a dump folder"
                    )
                if member.name in seen:
                    raise IntegrityError(f"{name} holds {member.name!r} twice")
                seen.add(member.name)
                report.members.append(member.name)
                handle = archive.extractfile(member)
                assert handle is not None
                with contextlib.ExitStack() as stack:
                    out = None
                    if extract_to is not None:
                        out = stack.enter_context(open_private(extract_to / member.name))
                    pieces = _member_chunks(handle, out)
                    if member.name == TOC_NAME:
                        data = b"".join(pieces)  # small: one entry per object
                        toc = DirectoryToc.parse(data, encoding)
                        counter.read_toc(data)
                        report.toc_entries = len(toc.files)
                    elif _BLOBS_TOC.match(member.name):
                        listed_blobs |= _blob_files(b"".join(pieces), name, member.name)
                    elif decode_data and _DATA_FILE.match(member.name):
                        table_data = counter.reader(member.name)
                        reader = table_data or _DataFileReader(member.name)
                        for chunk in pieces:
                            reader.feed(chunk)
                        if table_data is not None:
                            counter.done(reader)
                        else:
                            reader.finish()
                        report.data_bytes += reader.size
                    else:
                        for _ in pieces:
                            pass
            while stream.read(CHUNK_SIZE):  # the end-of-archive blocks
                pass
    except tarfile.TarError as exc:
        raise IntegrityError(f"{name} is not a readable tar of a dump folder: {exc}") from None
    if toc is None or report.members[:1] != [TOC_NAME]:
        raise IntegrityError(f"{name} does not start with the dump's {TOC_NAME}")
    present = set(report.members)
    missing = sorted(
        listed
        for listed in toc.data_files | listed_blobs
        if listed not in present and listed + ".gz" not in present
    )
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise IntegrityError(
            f"{name} lacks data files its table of contents lists: {', '.join(missing[:5])}{more}"
        )
    report.tar_bytes = tar_size()
    report.row_counts = counter.result()
    return report


def _blob_files(data: bytes, name: str, member: str) -> set[str]:
    files = set()
    for line in data.decode("ascii", "replace").splitlines():
        fields = line.split(" ")
        if len(fields) != 2 or not fields[0].isdigit():
            raise IntegrityError(f"{name}: {member} is not a list of large objects")
        files.add(fields[1])
    return files
