"""Streaming compression codecs. gzip output is a standard gzip file (``gunzip -c`` reads it)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Protocol

import zstandard

from backup_pipelines.engine.errors import IntegrityError

CHUNK_SIZE = 1 << 20
_ZSTD_FEED = 1024
_GZIP_WBITS = 31  # zlib: deflate with a gzip header and CRC32 trailer


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def compressor(codec: str, level: int, *, threads: int = 1) -> Compressor:
    """A streaming compressor; zstd uses ``threads`` worker threads when more than one."""
    if codec == "gzip":
        return zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
    if codec == "zstd":
        # The frame checksum makes zstd detect corruption on its own, as gzip does with its CRC.
        return zstandard.ZstdCompressor(
            level=level, write_checksum=True, threads=threads if threads > 1 else 0
        ).compressobj()
    if codec == "none":
        return _Identity()
    raise ValueError(f"unknown compression {codec!r}")


def decompress_chunks(
    codec: str, chunks: Iterable[bytes], *, name: str = "backup"
) -> Iterator[bytes]:
    """Decompress a stream, failing on corruption *and* on truncation (a missing end marker)."""
    if codec == "none":
        yield from chunks
        return
    if codec == "gzip":
        decoder = zlib.decompressobj(_GZIP_WBITS)
        try:
            for chunk in chunks:
                while chunk:
                    # Bounded output per call: highly compressible dumps must not balloon memory.
                    out = decoder.decompress(chunk, CHUNK_SIZE)
                    if out:
                        yield out
                    if decoder.eof:
                        # Concatenated gzip members are valid gzip (gunzip reads them all).
                        chunk = decoder.unused_data
                        if chunk:
                            decoder = zlib.decompressobj(_GZIP_WBITS)
                    else:
                        chunk = decoder.unconsumed_tail
            tail = decoder.flush()
            if tail:
                yield tail
        except zlib.error as exc:
            raise IntegrityError(
                f"{name} is corrupt: gzip data cannot be decompressed ({exc})",
                hint="restore from another backup or from the offsite copy",
            ) from None
        if not decoder.eof:
            raise IntegrityError(
                f"{name} is truncated: the gzip stream ends before its end marker",
                hint="the file was cut short (disk full or interrupted copy); use another backup",
            )
        return
    if codec == "zstd":
        zstd_decoder = zstandard.ZstdDecompressor().decompressobj()
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                # zstd's decompressobj has no output limit: feeding small slices bounds what one
                # call can return (and keeps truncation detection, which stream readers lack).
                for start in range(0, len(view), _ZSTD_FEED):
                    piece = bytes(view[start : start + _ZSTD_FEED])
                    while piece:
                        out = zstd_decoder.decompress(piece)
                        if out:
                            yield out
                        piece = zstd_decoder.unused_data if zstd_decoder.eof else b""
                        if piece:
                            zstd_decoder = zstandard.ZstdDecompressor().decompressobj()
        except zstandard.ZstdError as exc:
            raise IntegrityError(
                f"{name} is corrupt: zstd data cannot be decompressed ({exc})",
                hint="restore from another backup or from the offsite copy",
            ) from None
        if not zstd_decoder.eof:
            raise IntegrityError(
                f"{name} is truncated: the zstd stream ends before its end marker",
                hint="the file was cut short (disk full or interrupted copy); use another backup",
            )
        return
    raise ValueError(f"unknown compression {codec!r}")


def read_chunks(handle: IO[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    while True:
        chunk = handle.read(size)
        if not chunk:
            return
        yield chunk
