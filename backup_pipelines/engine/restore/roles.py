"""Creating the roles a backup needs on a server that lacks them, from the backup's globals file.

Why not feed the globals file to psql: pg_dumpall writes ``CREATE ROLE`` (which fails for a role
that exists) followed by ``ALTER ROLE ... WITH ... PASSWORD``, which would silently reset the
attributes, password and settings of every role the server already has, including the one
running the restore. A restore must never change existing roles, so the file is parsed into
statements and only these are applied, in one transaction (all or nothing):

- the statements about a role that is missing here (``CREATE ROLE``, ``ALTER ROLE ... WITH``
  including its password hash, ``ALTER ROLE ... SET`` settings, ``COMMENT ON ROLE``,
  ``SECURITY LABEL ... ON ROLE``);
- a membership ``GRANT role TO member`` when the *member* is one of the roles just created
  (``GRANTED BY`` is dropped: the grantor of the source may not exist here). A membership of
  an existing role is skipped and named in the log: granting it would widen what an existing
  role may do.

Tablespaces are not created (their folder is a path on the source server): the missing ones
are named in the log, to be created by hand before restoring objects that use them. Parameter
privileges (``GRANT SET ON PARAMETER``) are named in the log too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from backup_pipelines.engine.errors import RestoreFailedError


def split_statements(text: str) -> list[str]:
    """The SQL statements of pg_dumpall's output, without comments and psql meta-commands.

    Quotes are tracked (``'...'`` with ``''``, ``"..."`` with ``""``), so a ``;`` or a newline
    inside a role's comment or name does not split a statement.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        ch = text[i]
        if at_line_start and not "".join(current).strip() and ch == "\\":
            # A psql meta-command (\connect, \restrict ...) runs to the end of its line.
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            at_line_start = True
            continue
        if ch in ("'", '"'):
            j = i + 1
            while j < n:
                if text[j] == ch:
                    if j + 1 < n and text[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            current.append(text[i : j + 1])
            i = j + 1
            at_line_start = False
            continue
        if ch == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
            i += 1
            continue
        current.append(ch)
        at_line_start = ch == "\n"
        i += 1
    if "".join(current).strip():
        raise RestoreFailedError("the globals file ends inside a statement: it is incomplete")
    return statements


_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)'
_ROLE_STATEMENT = re.compile(
    rf"^(?:CREATE ROLE|ALTER ROLE|COMMENT ON ROLE|SECURITY LABEL FOR {_IDENT} ON ROLE)\s+({_IDENT})",
    re.DOTALL,
)
_MEMBERSHIP = re.compile(
    rf"^GRANT\s+({_IDENT})\s+TO\s+({_IDENT})((?:\s+WITH\s+[A-Za-z ,]+?)?)"
    rf"(?:\s+GRANTED\s+BY\s+{_IDENT})?$",
    re.DOTALL,
)
_TABLESPACE = re.compile(rf"^CREATE TABLESPACE\s+({_IDENT})", re.DOTALL)


def parse_ident(token: str) -> str:
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token


def _tablespace_defined(statement: str) -> str | None:
    match = _TABLESPACE.match(statement)
    return None if match is None else parse_ident(match.group(1))


def tablespaces_defined(globals_sql: str) -> list[str]:
    """The names of the tablespaces (other than the built-in two) a globals file creates."""
    names = (_tablespace_defined(statement) for statement in split_statements(globals_sql))
    return [name for name in names if name is not None]


@dataclass
class RolesReport:
    """What the roles step did; names only, never a password."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # existed here: left exactly as they are
    memberships: int = 0
    settings: int = 0
    skipped_memberships: list[str] = field(default_factory=list)
    missing_tablespaces: list[str] = field(default_factory=list)
    parameter_privileges: int = 0

    def summary(self) -> str:
        text = (
            f"created {len(self.created)} missing role(s)"
            + (f" ({', '.join(self.created)})" if self.created else "")
            + f" with {self.memberships} membership(s) and {self.settings} setting(s); "
            f"{len(self.kept)} existing role(s) left unchanged"
        )
        return text


def create_missing_roles(conn: psycopg.Connection, globals_sql: str, *, log: Any) -> RolesReport:
    """Apply the globals of ``globals_sql`` that only concern roles missing on ``conn``'s
    server (see the module docstring), in one transaction. Raises on any error, creating
    nothing."""
    statements = split_statements(globals_sql)
    existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    report = RolesReport()
    to_run: list[str] = []
    for statement in statements:
        head = " ".join(statement.split()[:3]).upper()
        if head.startswith("CREATE ROLE"):
            match = _ROLE_STATEMENT.match(statement)
            if match is None:
                continue
            role = parse_ident(match.group(1))
            if role in existing:
                report.kept.append(role)
            elif role not in report.created:
                report.created.append(role)
    new = set(report.created)
    for statement in statements:
        role_match = _ROLE_STATEMENT.match(statement)
        if role_match is not None:
            if parse_ident(role_match.group(1)) in new:
                to_run.append(statement)
                if statement.upper().startswith("ALTER ROLE") and re.search(
                    r"\sSET\s", statement, re.IGNORECASE
                ):
                    report.settings += 1
            continue
        membership = _MEMBERSHIP.match(statement)
        if membership is not None:
            granted, member = (parse_ident(membership.group(i)) for i in (1, 2))
            if member in new:
                to_run.append(
                    f"GRANT {membership.group(1)} TO {membership.group(2)}{membership.group(3)}"
                )
                report.memberships += 1
            else:
                report.skipped_memberships.append(f"{granted} TO {member}")
            continue
        tablespace = _tablespace_defined(statement)
        if tablespace is not None:
            report.missing_tablespaces.append(tablespace)
            continue
        if re.search(r"\sON\s+PARAMETER\s", statement, re.IGNORECASE):
            report.parameter_privileges += 1
    if report.missing_tablespaces:
        present = {row[0] for row in conn.execute("SELECT spcname FROM pg_tablespace").fetchall()}
        report.missing_tablespaces = [t for t in report.missing_tablespaces if t not in present]
    with conn.transaction():
        for statement in to_run:
            # pg_dumpall's own statements, never built from input here: executed as written.
            conn.execute(sql.SQL(statement))
    log.info(f"Roles: {report.summary()}")
    if report.skipped_memberships:
        log.warning(
            "Role memberships of roles that already exist here were not granted (a restore "
            "never changes existing roles): " + ", ".join(report.skipped_memberships)
        )
    if report.missing_tablespaces:
        log.warning(
            "Tablespaces of the source server are missing here and were not created (their "
            "folder is a path on that server): "
            + ", ".join(report.missing_tablespaces)
            + "; create them (CREATE TABLESPACE ... LOCATION ...) before restoring objects "
            "stored in them"
        )
    if report.parameter_privileges:
        log.warning(
            f"{report.parameter_privileges} parameter privilege(s) (GRANT SET ON PARAMETER) "
            "of the globals file were not applied; grant them by hand if the roles need them"
        )
    return report
