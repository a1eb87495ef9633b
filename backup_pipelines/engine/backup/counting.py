"""Exact per-table row counts read from the dump stream itself, so the source is scanned once.

pg_dump writes every table's rows in COPY text format, one row per line (newlines inside values
are escaped), so the rows of a table are the newlines of its data:

- plain format: the lines between ``COPY schema.table (...) FROM stdin;`` and ``\\.``;
- custom format with pg_dump's own compression off (``-Z0``, how we dump whenever we compress
  ourselves): the length-prefixed chunks of each TABLE DATA entry's data block, the entry's
  schema and name coming from the archive's table of contents.

The counters are fed the stream chunk by chunk (constant memory: at most one header line or a
few bytes are carried between chunks) and never fail the backup: anything they do not expect
marks the counts unusable and the caller falls back to counting in the dump's snapshot.
"""

from __future__ import annotations

import codecs
import re
import struct
from array import array
from collections.abc import Iterable
from typing import Protocol

__all__ = [
    "CustomArchiveCounter",
    "PlainCopyCounter",
    "StreamCounter",
    "python_encoding",
    "reconcile_counts",
    "stream_counter",
]


class StreamCounter(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def result(self) -> dict[str, int] | None:
        """Rows per ``schema.table`` (each table seen once), or None if the stream was not
        what the counter understands."""
        ...


def python_encoding(pg_encoding: str) -> str | None:
    """The Python codec for a PostgreSQL server encoding (the encoding pg_dump writes in)."""
    name = pg_encoding.upper()
    if name == "UTF8":
        return "utf-8"
    if name == "SQL_ASCII":
        # Bytes without an encoding: one character per byte, as connect() reads them.
        return "latin-1"
    aliases = {"WIN": "cp", "LATIN": "latin", "ISO_8859_": "iso8859-", "KOI8R": "koi8_r"}
    for prefix, python in aliases.items():
        if name.startswith(prefix):
            candidate = python + name[len(prefix) :]
            break
    else:
        candidate = name.lower()
    try:
        return codecs.lookup(candidate).name
    except LookupError:
        return None


_IDENT = r'(?:"(?:[^"]|"")*"|[^\s".]+)'
# pg_dump writes "COPY %s %s FROM stdin;" with the column list, empty for a table without columns.
_COPY_HEADER = re.compile(rf"COPY ({_IDENT})\.({_IDENT}) (?:\(.*\))? FROM stdin;", re.DOTALL)


def _unquote(identifier: str) -> str:
    if identifier.startswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


# Backslashes met before the search for a terminator switches from memchr to a pattern search.
_BACKSLASH_PROBES = 64


def _find_copy_end(buf: bytes, pos: int) -> int:
    """Where ``\\n\\\\.\\n`` (a line holding only ``\\.``) starts in ``buf`` at or after
    ``pos``, or -1 when it is not (or not yet wholly) there.

    A backslash is rare in COPY data (it only starts an escape such as ``\\N``), and a
    one-byte search is memchr, 30 times faster than any pattern search over line data. Data
    thick with escapes (many NULLs) switches to the pattern search after a few probes, so no
    table costs more than before."""
    probe = pos + 1  # the backslash follows the newline at ``pos`` or later
    for _ in range(_BACKSLASH_PROBES):
        at = buf.find(b"\\", probe)
        if at < 0 or at + 2 >= len(buf):
            return -1
        if buf[at + 1] == 46 and buf[at + 2] == 10 and buf[at - 1] == 10:
            return at - 1
        probe = at + 1
    return _find_copy_end_by_pattern(buf, probe - 1)


def _find_copy_end_by_pattern(buf: bytes, pos: int) -> int:
    # Searched for by its rarer bytes: a pattern ending in a newline makes bytes.find slow on
    # line data.
    while True:
        at = buf.find(b"\n\\.", pos)
        if at < 0 or at + 3 >= len(buf):
            return -1
        if buf[at + 3] == 10:
            return at
        pos = at + 1


class PlainCopyCounter:
    """Counts the data lines of every ``COPY ... FROM stdin;`` block of a plain-format dump."""

    _START = b"\nCOPY "
    _END = b"\n\\.\n"
    _MAX_HEADER = 1 << 20

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # The stream starts at a line start: a virtual newline, never counted.
        self._carry = b"\n"
        self._table: str | None = None
        self._rows = 0
        self._counts: dict[str, int] = {}
        self._broken = False

    def feed(self, chunk: bytes) -> None:
        if self._broken or not chunk:
            return
        buf = self._carry + chunk if self._carry else chunk
        # Bytes of buf before ``done`` were seen already (their newlines are accounted for).
        done = len(self._carry)
        pos = 0
        while not self._broken:
            if self._table is not None:
                end = _find_copy_end(buf, pos)
                if end < 0:
                    self._rows += _newlines(buf, max(pos, done), len(buf))
                    keep = max(pos, len(buf) - (len(self._END) - 1))
                    self._carry = buf[keep:]
                    return
                # The newline at ``end`` closes the last row.
                self._rows += _newlines(buf, max(pos, done), end + 1)
                self._close_table()
                pos = end + len(self._END) - 1  # the terminator's newline starts the next line
                continue
            start = buf.find(self._START, pos)
            if start < 0:
                self._carry = buf[max(pos, len(buf) - (len(self._START) - 1)) :]
                return
            line_end = buf.find(b"\n", start + 1)
            while line_end >= 0 and buf.count(b'"', start, line_end) % 2:
                line_end = buf.find(b"\n", line_end + 1)  # inside a quoted name: not the end
            if line_end < 0:
                if len(buf) - start > self._MAX_HEADER:
                    self._broken = True
                self._carry = buf[start:]
                return
            self._open_table(buf[start + 1 : line_end])
            pos = line_end  # the header's newline: the block's data starts on the next line
            done = max(done, line_end + 1)

    def _open_table(self, header: bytes) -> None:
        try:
            match = _COPY_HEADER.fullmatch(header.decode(self._encoding))
        except UnicodeDecodeError:
            match = None
        if match is None:
            self._broken = True
            return
        self._table = f"{_unquote(match.group(1))}.{_unquote(match.group(2))}"
        self._rows = 0

    def _close_table(self) -> None:
        assert self._table is not None
        if self._table in self._counts:
            self._broken = True
        self._counts[self._table] = self._rows
        self._table = None

    def result(self) -> dict[str, int] | None:
        if self._broken or self._table is not None or self._carry.startswith(self._START):
            return None
        return dict(self._counts)


# pg_backup_archiver.h: archive versions (major, minor, revision) this reader understands.
_OLDEST, _NEWEST = (1, 12, 0), (1, 16, 0)
_BLK_DATA, _BLK_BLOBS = 1, 3
_FORMAT_CUSTOM = 1
_COPY_END = b"\\.\n\n\n"
# Archive int sizes: (struct code, array code of the same size).
_INT_CODES = {4: ("I", "I"), 8: ("Q", "Q")}


def _newlines(buf: bytes, start: int, end: int) -> int:
    return buf.count(b"\n", start, end)


class _NeedMore(Exception):
    """The buffer ends inside the item being read; wait for the next chunk."""


class _Malformed(Exception):
    pass


class CustomArchiveCounter:
    """Counts the rows of every TABLE DATA entry of a custom-format archive written with
    pg_dump's compression off: the newlines of the entry's data chunks.

    Layout (pg_backup_archiver.c, pg_backup_custom.c): header, table of contents, then one
    block per entry with data: a type byte, the dump id, and chunks each prefixed by its length,
    ending with a zero length (large-object blocks: per object its oid and such chunks, ending
    with a zero oid).
    """

    # The archive format byte of the header (pg_backup.h: archCustom) and whether the data
    # may be compressed by pg_dump (a subclass reading only the TOC does not mind).
    _ARCHIVE_FORMAT = _FORMAT_CUSTOM
    _COMPRESSED_DATA_OK = False

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._head = bytearray()  # the header and TOC until they are complete
        self._buf = b""
        self._phase = "head"
        self._int_size = 4
        self._off_size = 8
        self._version = (0, 0, 0)
        self._tables: dict[int, str] = {}
        self._counts: dict[str, int] = {}
        self._broken = False
        self._retry_at = 0  # parse the header and TOC again once the buffer is this long
        # Data phase: the block being read and the bytes of the current chunk still to come.
        self._block: str | None = None
        self._dump_id = 0
        self._rows = 0
        self._left = 0
        self._array_code = "I"
        self._unpack = struct.Struct("<BI").unpack_from
        self._tail = b""  # the last bytes of the previous chunk of the stream

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            if self._phase == "data":
                self._feed_data(chunk)
                return
            self._head += chunk
            if len(self._head) < self._retry_at:
                return
            self._read_head_and_toc()
        except _Malformed:
            self._broken = True

    # -- header and table of contents (small: parsed whole, once all of it has arrived) --

    def _read_head_and_toc(self) -> None:
        head = bytes(self._head)
        try:
            pos = self._read_head(head)
            pos = self._read_toc(head, pos)
        except _NeedMore:
            if len(head) > 256 << 20:  # a TOC this large is not something we expect
                raise _Malformed from None
            # Not every few bytes: re-reading a large TOC on each small chunk is quadratic.
            self._retry_at = 2 * len(head)
            return
        self._head = bytearray()
        self._phase = "data"
        self._feed_data(head[pos:])

    def _int(self, buf: bytes, pos: int) -> tuple[int, int]:
        end = pos + 1 + self._int_size
        if end > len(buf):
            raise _NeedMore
        value = int.from_bytes(buf[pos + 1 : end], "little")
        return (-value if buf[pos] else value), end

    def _str(self, buf: bytes, pos: int) -> tuple[str | None, int]:
        length, pos = self._int(buf, pos)
        if length < 0:
            return None, pos
        if pos + length > len(buf):
            raise _NeedMore
        try:
            return buf[pos : pos + length].decode(self._encoding), pos + length
        except UnicodeDecodeError:
            raise _Malformed from None

    def _read_head(self, buf: bytes) -> int:
        if len(buf) < 11:
            raise _NeedMore
        if buf[:5] != b"PGDMP":
            raise _Malformed
        self._version = (buf[5], buf[6], buf[7])
        self._int_size, self._off_size, archive_format = buf[8], buf[9], buf[10]
        if self._int_size not in _INT_CODES:
            raise _Malformed
        struct_code, self._array_code = _INT_CODES[self._int_size]
        self._unpack = struct.Struct("<B" + struct_code).unpack_from
        if not _OLDEST <= self._version <= _NEWEST or archive_format != self._ARCHIVE_FORMAT:
            raise _Malformed
        pos = 11
        if self._version >= (1, 15, 0):
            if pos >= len(buf):
                raise _NeedMore
            compressed = buf[pos] != 0
            pos += 1
        else:
            level, pos = self._int(buf, pos)
            compressed = level != 0
        if compressed and not self._COMPRESSED_DATA_OK:
            raise _Malformed  # pg_dump compressed the data: nothing to count from the stream
        for _ in range(7):  # creation time
            _, pos = self._int(buf, pos)
        for _ in range(3):  # database name, server version, pg_dump version
            _, pos = self._str(buf, pos)
        return pos

    def _read_toc(self, buf: bytes, pos: int) -> int:
        entries, pos = self._int(buf, pos)
        tables: dict[int, str] = {}
        for _ in range(entries):
            dump_id, pos = self._int(buf, pos)
            _, pos = self._int(buf, pos)  # has a data dumper
            _, pos = self._str(buf, pos)  # table oid
            _, pos = self._str(buf, pos)  # oid
            tag, pos = self._str(buf, pos)
            desc, pos = self._str(buf, pos)
            _, pos = self._int(buf, pos)  # section
            _, pos = self._str(buf, pos)  # definition
            _, pos = self._str(buf, pos)  # drop statement
            _, pos = self._str(buf, pos)  # copy statement
            namespace, pos = self._str(buf, pos)
            _, pos = self._str(buf, pos)  # tablespace
            _, pos = self._str(buf, pos)  # table access method
            if self._version >= (1, 16, 0):
                _, pos = self._int(buf, pos)  # relkind
            _, pos = self._str(buf, pos)  # owner
            _, pos = self._str(buf, pos)  # "with oids"
            while True:  # dependencies, ended by a null string
                dependency, pos = self._str(buf, pos)
                if dependency is None:
                    break
            pos = self._read_extra_toc(buf, pos, dump_id)
            if desc == "TABLE DATA":
                if namespace is None or tag is None:
                    raise _Malformed
                tables[dump_id] = f"{namespace}.{tag}"
        self._tables = tables
        return pos

    def _read_extra_toc(self, buf: bytes, pos: int, dump_id: int) -> int:
        """The format's own part of a TOC entry; custom: the data block's offset (unknown
        when streaming)."""
        pos += 1 + self._off_size
        if pos > len(buf):
            raise _NeedMore
        return pos

    # -- data blocks (the bulk of the archive: a tight loop over chunk headers) --

    def _feed_data(self, chunk: bytes) -> None:
        buf = self._buf + chunk if self._buf else chunk
        self._buf = b""
        pos = 0
        n = len(buf)
        header = 1 + self._int_size
        counting = self._block == "table"
        rows = self._rows
        left = self._left
        while True:
            if left:
                end = pos + left
                if end > n:
                    if counting:
                        rows += buf.count(b"\n", pos)
                    self._left = end - n
                    self._rows = rows
                    self._tail = (self._tail + buf[-8:])[-8:]
                    return
                if counting:
                    rows += buf.count(b"\n", pos, end)
                pos = end
                left = 0
            if self._block in ("table", "other"):
                pos, left, found = self._walk_chunks(buf, pos, counting)
                rows += found
                if left:
                    continue
            if self._block is None:
                if pos + 1 + header > n:
                    break
                kind = buf[pos]
                self._dump_id = int.from_bytes(buf[pos + 2 : pos + 1 + header], "little")
                pos += 1 + header
                if kind == _BLK_DATA:
                    self._block = "table" if self._dump_id in self._tables else "other"
                elif kind == _BLK_BLOBS:
                    self._block = "blob-oid"
                else:
                    raise _Malformed
                counting = self._block == "table"
                rows = 0
                continue
            if pos + header > n:
                break
            value = int.from_bytes(buf[pos + 1 : pos + header], "little")
            if buf[pos]:
                raise _Malformed  # no negative lengths or oids
            pos += header
            if self._block == "blob-oid":
                # A large object's oid, or 0 after the last one.
                self._block = "blob" if value else None
            elif value:
                left = value
            elif self._block == "blob":
                self._block = "blob-oid"
            else:
                if counting:
                    # pg_dump ends each table's data with its own chunk "\\.\n\n\n" (the end
                    # of COPY data and two blank lines): three newlines that are no rows.
                    before = pos - header
                    last = buf[max(0, before - 5) : before]
                    if len(last) < 5:
                        last = (self._tail + last)[-5:]
                    if last != _COPY_END:
                        raise _Malformed
                    self._close(rows - 3)
                self._block = None
                counting = False
        self._rows = rows
        self._left = 0
        self._buf = buf[pos:]
        self._tail = (self._tail + buf[max(0, pos - 8) : pos])[-8:]

    def _walk_chunks(self, buf: bytes, pos: int, counting: bool) -> tuple[int, int, int]:
        """Skip the data chunks from ``pos`` up to the block's end (a zero length) or the end of
        ``buf``: returns the position reached, the bytes of a chunk still to come, and the
        newlines in the chunks' data. The hot path: one struct call per chunk (pg_dump writes one
        chunk per row), the newlines counted at C speed over the whole stretch, less those the
        length fields themselves happen to hold."""
        unpack = self._unpack
        header = 1 + self._int_size
        n = len(buf)
        start = pos
        lengths = array(self._array_code)
        add = lengths.append
        while pos + header <= n:
            sign, value = unpack(buf, pos)
            if sign:
                raise _Malformed  # no negative lengths
            if not value:
                break
            pos += header + value
            add(value)
        left = max(0, pos - n)
        pos -= left
        if not counting:
            return pos, left, 0
        found = _newlines(buf, start, pos) - lengths.tobytes().count(b"\n")
        return pos, left, found

    def _close(self, rows: int) -> None:
        table = self._tables[self._dump_id]
        if table in self._counts:
            raise _Malformed
        self._counts[table] = rows

    def result(self) -> dict[str, int] | None:
        if self._phase == "head" and not self._broken:
            self._retry_at = 0
            self.feed(b"")
        if self._broken or self._phase != "data" or self._block is not None or self._buf:
            return None
        if self._left:
            return None
        return dict(self._counts)


def stream_counter(
    dump_format: str, pg_dump_compresses: bool, encoding: str
) -> StreamCounter | None:
    """The counter for a dump in this format, or None when its rows cannot be counted from the
    stream (pg_dump compressed the data itself, or the encoding is unknown to Python)."""
    python = python_encoding(encoding)
    if python is None or pg_dump_compresses:
        return None
    if dump_format == "plain":
        return PlainCopyCounter(python)
    if dump_format == "custom":
        return CustomArchiveCounter(python)
    return None


def reconcile_counts(
    counted: dict[str, int] | None, tables: Iterable[tuple[str, str]]
) -> dict[str, int] | None:
    """The ``.meta`` row counts from the stream's counts and the tables whose rows the dump holds
    (``tables_with_data`` in the dump's snapshot), or None when they do not match one to one.

    Data of tables outside that list (an extension's configuration tables) is left out, as the
    snapshot count always did; a listed table without data in the stream means the stream was
    not read as expected, so the caller counts in the snapshot instead.
    """
    if counted is None:
        return None
    result: dict[str, int] = {}
    for schema, table in tables:
        key = f"{schema}.{table}"
        if key not in counted:
            return None
        result[key] = counted[key]
    return result
