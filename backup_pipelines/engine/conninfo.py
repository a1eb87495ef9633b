"""Connection strings: libpq's own parse of a target's URL, the environment child processes
get it through, and what may be shown of it.

Connection URLs may hold passwords. They are parsed here once and handed to child processes
only through their environment (``PGPASSWORD`` and friends), never through argv, and only the
password-free description (``user@host:port/db``) ever reaches a log or an error. Nothing here
imports psycopg: a backup parses its target's URL before pg_dump starts, and psycopg takes a
quarter of a second to import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backup_pipelines.engine.errors import ConfigError

# libpq connection parameters and the environment variables libpq reads them from.
_PARAM_TO_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslpassword": "PGSSLPASSWORD",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "gssencmode": "PGGSSENCMODE",
    "channel_binding": "PGCHANNELBINDING",
    "krbsrvname": "PGKRBSRVNAME",
}
_SECRET_PARAMS = {"password", "sslpassword"}
DEFAULT_CONNECT_TIMEOUT = "10"


# Connection parameters with a fixed set of values (libpq's documentation).
_ENUM_PARAMS: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}


@dataclass(frozen=True)
class ConnectionInfo:
    """A parsed libpq connection string. ``str()`` never shows a password."""

    params: Mapping[str, str]

    @classmethod
    def parse(cls, dsn: str, *, source: str = "connection URL") -> ConnectionInfo:
        params = _libpq_parse(dsn)
        if params is None:
            # libpq's message can echo the URL, password included: say only what is wrong.
            raise ConfigError(
                f"{source} is not a valid libpq connection string",
                hint="use the form postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME",
            )
        for port in str(params.get("port") or "").split(","):
            if port.strip() and not (port.strip().isdigit() and 0 < int(port) < 65536):
                raise ConfigError(
                    f"{source} has an invalid port {port.strip()!r}",
                    hint="use a port number between 1 and 65535, e.g. postgresql://USER@HOST:5432/DBNAME",
                )
        # libpq would only refuse these when connecting, looking like a network failure.
        for key, allowed in _ENUM_PARAMS.items():
            value = params.get(key)
            if value is not None and str(value) not in allowed:
                raise ConfigError(
                    f"{source} has an invalid {key} {str(value)!r}",
                    hint=f"use one of: {', '.join(allowed)}",
                )
        timeout = params.get("connect_timeout")
        if timeout is not None and not str(timeout).strip().lstrip("-").isdigit():
            raise ConfigError(
                f"{source} has an invalid connect_timeout {str(timeout)!r}",
                hint="use a number of seconds, e.g. ?connect_timeout=10",
            )
        explicit = {k: str(v) for k, v in params.items() if v is not None}
        return cls({**_service_params(explicit, source), **explicit})

    @property
    def dbname(self) -> str:
        return (
            self.params.get("dbname")
            or self.params.get("user")
            or os.environ.get("PGDATABASE", os.environ.get("PGUSER", "postgres"))
        )

    @property
    def password(self) -> str | None:
        return self.params.get("password")

    def with_dbname(self, dbname: str) -> ConnectionInfo:
        return ConnectionInfo({**self.params, "dbname": dbname})

    def conninfo(self) -> str:
        """A libpq keyword string for psycopg (in-process only, never for argv)."""
        params = dict(self.params)
        params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        return " ".join(f"{key}={_quoted(value)}" for key, value in params.items())

    def dbname_option(self) -> str:
        """``--dbname=...`` for psql/pg_restore naming exactly this database.

        Those tools read a ``--dbname`` holding ``=`` (or starting with ``postgresql://``) as a
        connection string, so a database named ``dbname=other x=`` would connect to ``other``;
        as ``dbname='...'`` every name stays a name. Host, user and password come from
        :meth:`child_env` as usual.
        """
        return "--dbname=dbname=" + _quoted(self.dbname)

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for pg_dump/psql/pg_restore: every parameter as a PG* variable."""
        env = dict(os.environ if base is None else base)
        for var in _PARAM_TO_ENV.values():
            env.pop(var, None)
        for key, value in self.params.items():
            env_var = _PARAM_TO_ENV.get(key)
            if env_var:
                env[env_var] = value
        env.setdefault("PGCONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
        return env

    def describe(self) -> str:
        host = self.params.get("host") or self.params.get("hostaddr") or "localhost"
        port = self.params.get("port", "5432")
        user = self.params.get("user", "")
        return f"{user + '@' if user else ''}{host}:{port}/{self.dbname}"

    def redact(self, text: str) -> str:
        """Remove any secret this connection holds from ``text``."""
        for key in _SECRET_PARAMS:
            secret = self.params.get(key)
            # A one- or two-letter "secret" would mangle every word it occurs in and hide nothing.
            if secret and len(secret) >= 3:
                text = text.replace(secret, "********")
        return text

    def __repr__(self) -> str:
        return f"ConnectionInfo({self.describe()})"

    __str__ = describe


def _quoted(value: str) -> str:
    """A libpq keyword value, quoted as libpq reads it back: any name or password stays one."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Where libpq looks for pg_service.conf when PGSYSCONFDIR is not set: its build's sysconfdir
# (Debian's and the PGDG RPMs' packages).
_SYSTEM_SERVICE_DIRS = ("/etc/postgresql-common", "/etc/sysconfig/pgsql", "/etc")


def _service_params(explicit: Mapping[str, str], source: str) -> dict[str, str]:
    """The parameters a connection service (``service=NAME`` or ``$PGSERVICE``) holds, from the
    files libpq reads: the user's (``$PGSERVICEFILE``, default ``~/.pg_service.conf``), then
    the system's. libpq applies them only when connecting; the database, host and user must be
    known before (file names, the snapshot's session, restores), so they are read here the
    same way. Parameters given explicitly win, as in libpq."""
    name = explicit.get("service") or os.environ.get("PGSERVICE")
    if not name:
        return {}
    import configparser

    user_file = os.environ.get("PGSERVICEFILE") or os.path.expanduser("~/.pg_service.conf")
    system_dirs = [os.environ["PGSYSCONFDIR"]] if os.environ.get("PGSYSCONFDIR") else []
    files = [user_file] + [
        os.path.join(folder, "pg_service.conf") for folder in system_dirs or _SYSTEM_SERVICE_DIRS
    ]
    for path in files:
        parser = configparser.RawConfigParser(
            delimiters=("=",), comment_prefixes=("#",), strict=False, interpolation=None
        )
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(
                f"{source} names service {name!r}, but {path} cannot be read: {type(exc).__name__}",
                hint="fix the service file, or put the connection parameters in the URL",
            ) from None
        if parser.has_section(name):
            return {key: value.strip() for key, value in parser.items(name)}
    raise ConfigError(
        f"{source} names service {name!r}, which none of {', '.join(files)} defines",
        hint="define it there (or point PGSERVICEFILE at the file that does), or put the "
        "connection parameters in the URL",
    )


def _libpq_parse(dsn: str) -> dict[str, str] | None:
    """libpq's own parse of a connection string (PQconninfoParse), or None if it refuses it."""
    libpq = _libpq()
    if libpq is None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            parsed = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            return None
        return {key: str(value) for key, value in parsed.items() if value is not None}
    import ctypes

    error = ctypes.c_char_p()
    options = libpq.PQconninfoParse(dsn.encode(), ctypes.byref(error))
    if not options:
        if error:
            libpq.PQfreemem(error)
        return None
    try:
        params: dict[str, str] = {}
        index = 0
        while (option := options[index]).keyword is not None:  # a null keyword ends the array
            if option.val is not None:
                params[option.keyword.decode()] = option.val.decode()
            index += 1
        return params
    finally:
        libpq.PQconninfoFree(options)


@functools.cache
def _libpq() -> Any:
    """The system's libpq through ctypes (loaded in milliseconds, where psycopg takes a
    quarter second), or None where it cannot be loaded: then psycopg's copy does the parse."""
    import ctypes

    class Option(ctypes.Structure):
        _fields_ = [  # PQconninfoOption (libpq-fe.h)
            ("keyword", ctypes.c_char_p),
            ("envvar", ctypes.c_char_p),
            ("compiled", ctypes.c_char_p),
            ("val", ctypes.c_char_p),
            ("label", ctypes.c_char_p),
            ("dispchar", ctypes.c_char_p),
            ("dispsize", ctypes.c_int),
        ]

    for name in ("libpq.so.5", "libpq.5.dylib"):
        try:
            libpq = ctypes.CDLL(name)
        except OSError:
            continue
        libpq.PQconninfoParse.restype = ctypes.POINTER(Option)
        libpq.PQconninfoParse.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
        libpq.PQconninfoFree.argtypes = [ctypes.POINTER(Option)]
        libpq.PQfreemem.argtypes = [ctypes.c_void_p]
        return libpq
    return None
