"""The databases of a server target (``databases: all``): the ones on the server now, and the
ones that have backups (a dropped database keeps its folder, its backups and their retention).

Layout: ``<backup_root>/<target>/<database>/`` per database (see
:func:`backup_pipelines.engine.config.models.database_folder_name`), offsite
``<prefix>/<target>/<database>/``. A single-database target keeps ``<backup_root>/<target>/``.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from urllib.parse import unquote

from backup_pipelines.engine.artifacts import META_SUFFIX
from backup_pipelines.engine.config import Target
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError, RefusedError
from backup_pipelines.engine.fsutil import PARTIAL_SUFFIX
from backup_pipelines.engine.postgres import connect

# The prefix of the labels (COMMENT ON DATABASE) of the databases restores and drills create.
OUR_MARKER_PREFIX = "backup_pipelines:"
# Never backed up: template0 accepts no connections and template1 is the server's own template.
TEMPLATE_DATABASES = ("template0", "template1")


def is_excluded(database: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether ``database`` is a template or matches one of the ``exclude`` glob patterns."""
    return database in TEMPLATE_DATABASES or any(fnmatchcase(database, p) for p in patterns)


def server_databases(target: Target) -> list[str]:
    """The databases of ``target``'s server to back up, sorted: those that allow connections and
    are not templates (``pg_database``), minus ``exclude``. A database the backup role may not
    connect to is listed: its own backup then fails and says so, the others are unaffected."""
    _require_server(target)
    info = ConnectionInfo.parse(target.dsn(), source=f"{target.label} ({target.settings.dsn_env})")
    with connect(info, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datallowconn AND NOT datistemplate ORDER BY datname"
        ).fetchall()
    return [
        name
        for name, comment in rows
        if not is_excluded(name, target.settings.exclude) and not _made_by_us(comment)
    ]


def _made_by_us(comment: str | None) -> bool:
    """A database this tool made and labelled: a restore in progress, the database a restore
    replaced (covered by its pre-restore safety backup), a drill's scratch copy. Backing those
    up would fill the backup root with copies of copies."""
    if not comment or not comment.startswith("{"):
        return False
    try:
        label = json.loads(comment)
    except ValueError:
        return False
    return isinstance(label, dict) and str(label.get("marker", "")).startswith(OUR_MARKER_PREFIX)


def databases_with_backups(target: Target) -> list[str]:
    """Databases of a server target with a folder of backups under ``backup_dir`` (present or
    dropped from the server), sorted."""
    _require_server(target)
    if not target.backup_dir.is_dir():
        return []
    found = []
    for folder in target.backup_dir.iterdir():
        if folder.is_dir() and any(
            p.name.endswith((META_SUFFIX, PARTIAL_SUFFIX)) for p in folder.iterdir()
        ):
            found.append(unquote(folder.name))
    return sorted(found)


def database_targets(target: Target, database: str | None = None) -> list[Target]:
    """What a command given ``target`` (and ``--database``) works on: the target itself for a
    single database, that database of a server target, or every database of the server now."""
    if not target.settings.is_server:
        if database is not None:
            target.for_database(database)  # raises the one-line explanation
        return [target]
    if database is not None:
        return [target.for_database(database)]
    return [target.for_database(name) for name in server_databases(target)]


def watched_targets(target: Target) -> list[Target]:
    """What freshness checks and metrics read from disk for ``target``: the target itself, or
    each database of a server target that is on the server now (when the server cannot be
    reached: each database with backups, so their growing age still shows)."""
    try:
        return database_targets(target)
    except BackupPipelinesError:
        return [target.for_database(name) for name in databases_with_backups(target)]


def require_database(target: Target, database: str | None, command: str) -> Target:
    """The one database ``command`` (restore, drill) works on: refuses a server target without
    ``--database``, naming the databases it could be."""
    if not target.settings.is_server:
        return database_targets(target, database)[0]
    if database is not None:
        return target.for_database(database)
    known = sorted(set(databases_with_backups(target)) | set(_listable(target)))
    raise RefusedError(
        f"{command} needs --database: target '{target.name}' is a server with "
        f"{len(known)} database(s): {', '.join(known) or '(none found)'}",
        hint=f"run `backup-pipelines {command} ... --database NAME`",
    )


def _listable(target: Target) -> list[str]:
    # The refusal should name the databases even when the server is down (that is when
    # restores happen): fall back to the ones with backups.
    try:
        return server_databases(target)
    except Exception:
        return []


def _require_server(target: Target) -> None:
    if not target.is_server:
        raise ConfigError(
            f"target '{target.name}' is one database, not a server with 'databases: all'",
            hint="use the target as it is, or set 'databases: all' on it",
        )
