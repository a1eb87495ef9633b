"""The server's configuration files that live outside its data directory, captured into the
base backup.

Debian and Ubuntu (postgresql-common) keep ``postgresql.conf``, ``pg_hba.conf``,
``pg_ident.conf`` and ``conf.d/`` in ``/etc/postgresql/<ver>/<cluster>/``: pg_basebackup copies
only the data directory, so without them a restored copy cannot start. ``capture_server_config``
finds them (``config_file``, ``hba_file``, ``ident_file`` and every ``include``,
``include_if_exists`` and ``include_dir`` reachable from ``postgresql.conf``), and
``config_tar`` turns them into tar members appended to the base backup's own tar, under
``CONFIG_MEMBER_PREFIX`` + their absolute path: the same file, checksum, encryption and offsite
copy as the data. ``.meta`` lists them (path, size, SHA-256).

Also the one parser of postgresql.conf lines used on the way back (``engine.pitr.server_config``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupFailedError
from backup_pipelines.engine.postgres import connect

logger = logging.getLogger("backup_pipelines")

# Tar members under this prefix are the captured configuration, never part of the data directory.
CONFIG_MEMBER_PREFIX = "backup_pipelines_server_config/"
# The settings naming a configuration file, in the order they are captured.
FILE_SETTINGS = ("config_file", "hba_file", "ident_file")
INCLUDE_DIRECTIVES = ("include", "include_if_exists", "include_dir")
_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?\s*(.*?)\s*$")
_QUOTED_RE = re.compile(r"'((?:[^'\\]|''|\\.)*)'")
# Deep include chains are a mistake; PostgreSQL itself stops at 10.
_MAX_DEPTH = 10


class CapturedFile(BaseModel):
    """One configuration file stored in a base backup."""

    setting: str  # config_file, hba_file, ident_file or include
    path: str  # where the server read it
    member: str  # its tar member name in the base backup
    size_bytes: int
    sha256: str


@dataclass
class ServerConfig:
    """What a base backup records about the server's configuration files."""

    data_directory: str | None
    files: list[CapturedFile] = field(default_factory=list)
    contents: dict[str, bytes] = field(default_factory=dict)  # member name -> bytes
    missing: list[str] = field(default_factory=list)  # what could not be captured, and why


def member_name(path: str) -> str:
    return CONFIG_MEMBER_PREFIX + path.lstrip("/")


def parse_setting_line(line: str) -> tuple[str, str] | None:
    """``(lower-case name, value)`` of one postgresql.conf line, or None for a comment/blank.
    A quoted value is unquoted (``''`` and backslash escapes)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _LINE_RE.match(stripped)
    if not match:
        return None
    name, rest = match.group(1).lower(), match.group(2)
    quoted = _QUOTED_RE.match(rest)
    if quoted:
        raw = quoted.group(1)
        value = re.sub(r"\\(.)", r"\1", raw.replace("''", "'"))
    else:
        value = rest.split("#", 1)[0].strip()
    return name, value


def is_inside(path: str, folder: str | None) -> bool:
    if not folder:
        return False
    folder = posixpath.normpath(folder)
    return posixpath.normpath(path) == folder or posixpath.normpath(path).startswith(folder + "/")


def include_target(including_file: str, value: str) -> str:
    """An include directive's path, absolute (relative ones are relative to the including file)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(including_file), value))


class _Reader:
    """Reads the server's files: directly when the server runs on this host (and we may), else
    through the server (``pg_read_binary_file``, superuser or pg_read_server_files)."""

    def __init__(self, info: ConnectionInfo) -> None:
        self.info = info
        self.local = _is_local(info)
        self.sql_error: str | None = None

    def _sql(self, query: str, arg: str) -> Any:
        with connect(self.info, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(query, (arg,))
            row = cur.fetchone()
        return row[0] if row else None

    def read(self, path: str) -> bytes:
        if self.local:
            with contextlib.suppress(OSError):
                return Path(path).read_bytes()
        try:
            data = self._sql("SELECT pg_read_binary_file(%s)", path)
        except Exception as exc:
            raise OSError(_sql_reason(exc)) from None
        return bytes(data)

    def list_dir(self, path: str) -> list[str]:
        if self.local:
            with contextlib.suppress(OSError):
                return sorted(p.name for p in Path(path).iterdir() if p.is_file())
        try:
            names = self._sql("SELECT array_agg(n ORDER BY n) FROM pg_ls_dir(%s) n", path)
        except Exception as exc:
            raise OSError(_sql_reason(exc)) from None
        return list(names or [])


def _sql_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"not readable on this host and through the server: {text}"


def _is_local(info: ConnectionInfo) -> bool:
    host = info.params.get("hostaddr") or info.params.get("host") or ""
    if not host or host.startswith("/") or host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def _settings(info: ConnectionInfo) -> dict[str, str | None]:
    names = ("data_directory", *FILE_SETTINGS)
    with connect(info, autocommit=True) as conn, conn.cursor() as cur:
        # pg_settings hides these from roles without pg_read_all_settings (no row): None.
        cur.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(names),))
        found = {str(name): (str(value) if value else None) for name, value in cur.fetchall()}
    return {name: found.get(name) for name in names}


def capture_server_config(info: ConnectionInfo, *, log: Any = None) -> ServerConfig:
    """Read every configuration file of the server that is outside its data directory.

    A file that cannot be read is listed in ``missing`` (with the reason) and logged as a
    warning: the backup itself is still good, but a restore of it has to supply that file."""
    log = log or logger
    settings = _settings(info)
    result = ServerConfig(settings["data_directory"])
    if result.data_directory is None:
        result.missing.append(
            "the server's configuration file locations (the backup role cannot see "
            "data_directory/config_file: grant it pg_read_all_settings)"
        )
    reader = _Reader(info)
    seen: set[str] = set()

    def capture(setting: str, path: str, *, optional: bool = False) -> bytes | None:
        if path in seen:
            return None
        seen.add(path)
        try:
            data = reader.read(path)
        except OSError as exc:
            if not optional:
                result.missing.append(f"{setting} {path}: {exc.strerror or exc}")
            return None
        if not is_inside(path, result.data_directory):
            name = member_name(path)
            result.contents[name] = data
            result.files.append(
                CapturedFile(
                    setting=setting,
                    path=path,
                    member=name,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        return data

    def follow_includes(conf_path: str, text: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        for line in text.splitlines():
            parsed = parse_setting_line(line)
            if parsed is None or parsed[0] not in INCLUDE_DIRECTIVES or not parsed[1]:
                continue
            directive, target = parsed[0], include_target(conf_path, parsed[1])
            if directive == "include_dir":
                try:
                    names = reader.list_dir(target)
                except OSError as exc:
                    result.missing.append(f"include_dir {target}: {exc.strerror or exc}")
                    continue
                paths = [
                    posixpath.join(target, n)
                    for n in names
                    if n.endswith(".conf") and not n.startswith(".")
                ]
            else:
                paths = [target]
            for path in paths:
                data = capture("include", path, optional=directive == "include_if_exists")
                if data is not None:
                    follow_includes(path, data.decode("utf-8", "replace"), depth + 1)

    for setting in FILE_SETTINGS:
        path = settings[setting]
        if path is None:
            continue
        data = capture(setting, path)
        if setting == "config_file" and data is not None:
            follow_includes(path, data.decode("utf-8", "replace"), 1)
    for problem in result.missing:
        log.warning(
            f"base backup: configuration file not captured: {problem}; a restore of this backup "
            "will have to supply it"
        )
    return result


def config_tar(config: ServerConfig, mtime: float) -> bytes:
    """The captured files as tar members, followed by the end-of-archive blocks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for captured in config.files:
            data = config.contents[captured.member]
            member = tarfile.TarInfo(captured.member)
            member.size, member.mode, member.mtime = len(data), 0o600, mtime
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


_ZERO_BLOCK = bytes(512)


class TarEndCutter:
    """Passes a tar stream through up to (not including) its end-of-archive blocks, so that
    more members can follow. Walks the headers (512-byte blocks, each followed by its data
    rounded up to 512) and checks every header's checksum: anything unexpected stops the backup
    rather than storing a tar that might not read back."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._pass = 0
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        view = memoryview(data)
        index = 0
        while index < len(view):
            if self.ended:
                if any(view[index:]):
                    raise BackupFailedError("pg_basebackup sent data after the end of its tar")
                break
            if self._pass:
                count = min(self._pass, len(view) - index)
                out.append(bytes(view[index : index + count]))
                self._pass -= count
                index += count
                continue
            take = view[index : index + 512 - len(self._header)]
            self._header += take
            index += len(take)
            if len(self._header) < 512:
                continue
            header = bytes(self._header)
            self._header.clear()
            if header == _ZERO_BLOCK:
                self.ended = True
                continue
            _check_header(header)
            out.append(header)
            self._pass = (_member_size(header) + 511) // 512 * 512
        return b"".join(out)


def _member_size(header: bytes) -> int:
    field_bytes = header[124:136]
    if field_bytes[0] & 0x80:  # base-256 (GNU), pg_basebackup's form for big files
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    return int(field_bytes.strip(b"\0 ") or b"0", 8)


def _check_header(header: bytes) -> None:
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        stored = -1
    # A pax header could change the next member's size; pg_basebackup never writes one.
    if header[156:157] in (b"x", b"g") or stored != computed:
        raise BackupFailedError(
            "pg_basebackup's tar stream has a header this tool does not understand "
            f"(member {header[:100].rstrip(bytes(1)).decode('utf-8', 'replace')!r})",
            hint="report this with the PostgreSQL version; nothing was stored",
        )
