"""Fault matrix, hostile names.

Database names are whatever PostgreSQL allows (any character, up to 63 bytes), so quotes,
semicolons, ``$(...)``, backticks, spaces, unicode, ``../`` and libpq connection-string syntax
(``dbname=... x=``) must go through backup, list, verify, restore, drill and restore-cleanup
untouched: nothing executed, nothing written outside ``backup_root``, no other database
touched. Target names are validated by the targets file: hostile ones are refused with one
clear line before anything happens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.postgres import content_fingerprint
from backup_pipelines_tests.fault_matrix.support import (
    EXIT_REFUSED,
    assert_clear_failure,
)

TOKEN = secrets.token_hex(3)
SENTINEL = Path(f"/tmp/fm-{TOKEN}")  # created only if something ran a shell command
VICTIM = f"fm_victim_{TOKEN}"  # a database that a name parsed as a connection string would hit

DATABASE_NAMES = {
    "shell": f"a'b\"c; rm -rf / $(touch {SENTINEL}) `id`",
    "unicode-path": "ümlaut db ../../escape",
    "conninfo": f"dbname={VICTIM} application_name=x",
    "longest": "-" + "ü" * 30 + "xy",  # 63 bytes, PostgreSQL's limit, starting with a dash
}


def _connect(pg: LocalCluster, dbname: str = "postgres") -> psycopg.Connection:
    info = ConnectionInfo.parse(pg.dsn()).with_dbname(dbname)
    return psycopg.connect(info.conninfo(), autocommit=True)


def _admin(pg: LocalCluster) -> psycopg.Connection:
    return _connect(pg)


def databases(pg: LocalCluster) -> set[str]:
    with _admin(pg) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def fingerprint(pg: LocalCluster, dbname: str) -> dict[str, str]:
    with _connect(pg, dbname) as conn:
        return content_fingerprint(conn)


@pytest.fixture
def hostile_db(pg: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = DATABASE_NAMES[request.param]
    assert len(name.encode()) <= 63
    with _admin(pg) as conn:
        for db in (name, VICTIM):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    with _connect(pg, name) as conn:
        conn.execute(
            "CREATE TABLE \"weird 'table'\" (id int PRIMARY KEY, note text);"
            "INSERT INTO \"weird 'table'\" SELECT g, 'Grüße ' || g FROM generate_series(1, 200) g"
        )
    yield name
    with _admin(pg) as conn:
        for db in databases(pg) | {name}:
            if db in (name, VICTIM) or db.startswith(name[:20]):
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hostile_db", list(DATABASE_NAMES), indirect=True)
def test_hostile_database_name_goes_through_every_command(
    pg: LocalCluster, hostile_db: str, make_project, cli, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = pg.dsn(urllib.parse.quote(hostile_db, safe=""))
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "restore": {"drop_previous_after_hours": 0}}},
        env={"DB_PROD": url},
    )
    target = config.target("prod")
    outside_before = _files_under(tmp_path) - _files_under(config.resolved_backup_root)

    backup = cli("backup", "prod")
    assert backup.returncode == 0, backup.stderr
    [artifact] = list_artifacts(target.backup_dir)
    assert artifact.path.parent == target.backup_dir
    assert artifact.meta.database == hostile_db
    at_backup = fingerprint(pg, hostile_db)

    listing = cli("list", "prod")
    assert listing.returncode == 0 and artifact.path.name in listing.stdout, listing.stderr
    verify = cli("verify", str(artifact.path))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr

    with _connect(pg, hostile_db) as conn:
        conn.execute("DELETE FROM \"weird 'table'\" WHERE id > 100")
    restore = cli("restore", "latest", "prod", "--confirm", "prod")
    assert restore.returncode == 0, restore.stderr
    assert fingerprint(pg, hostile_db) == at_backup

    drill = cli("drill", "prod")
    assert drill.returncode == 0 and "restore drill passed" in drill.stdout, drill.stdout
    cleanup = cli("restore-cleanup", "prod")
    assert cleanup.returncode == 0, cleanup.stderr

    # Nothing ran, nothing was written outside backup_root, no other database was touched.
    assert not SENTINEL.exists()
    assert _files_under(tmp_path) - _files_under(config.resolved_backup_root) == outside_before
    with _connect(pg, VICTIM) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchone() == (0,)
    leftovers = [d for d in databases(pg) if d != hostile_db and d.startswith(hostile_db[:20])]
    assert leftovers == []


@pytest.mark.parametrize(
    "name",
    ["a'b", "x; rm -rf /", "$(id)", "ümlaut db", "../up", "t" * 64, "-dash"],
)
def test_hostile_target_names_are_refused_before_anything_happens(
    name: str, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    config_file = tmp_path / "targets.yaml"
    root = tmp_path / "backups"
    config_file.write_text(
        yaml.safe_dump(
            {"backup_root": str(root), "targets": {name: {"dsn_env": "DB_X"}}},
            allow_unicode=True,
        )
    )
    for args in (("check-config",), ("backup", "--", name)):
        result = cli("--config", str(config_file), *args)
        # A bad name sets that target aside (the others would still work): it is named with
        # the rule it breaks, and nothing is run for it.
        output = result.stdout + result.stderr
        assert result.returncode == EXIT_REFUSED and "Traceback" not in output, output
        assert f"target name {name!r}" in output, output
        assert "letters, digits and underscores" in output, output
        if args[0] == "backup":
            assert_clear_failure(result, EXIT_REFUSED, f"target name {name!r}")
    assert not root.exists()
    assert not SENTINEL.exists()


def test_unknown_hostile_target_is_refused(tmp_path: Path, cli, make_project) -> None:  # type: ignore[no-untyped-def]
    make_project({"prod": {"dsn_env": "DB_X"}})
    result = cli("backup", f"$(touch {SENTINEL})")
    assert_clear_failure(result, EXIT_REFUSED, "unknown target", "use one of: prod")
    assert not SENTINEL.exists()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SENTINEL)
