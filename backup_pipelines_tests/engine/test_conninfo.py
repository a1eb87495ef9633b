"""Connection strings: libpq's own parse, quoting that survives any name or password."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.conninfo import ConnectionInfo, _libpq
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.postgres import connect, find_tools

VALID = [
    "postgresql://u:p%40ss@h:5433/db?sslmode=require&application_name=x",
    "postgres://h1:5432,h2:5433/db?target_session_attrs=read-write",
    "postgresql://[::1]:5432/db",
    "postgresql:///db?host=/var/run/postgresql",
    "host=a port=1 dbname='x y' password='it\\'s' user=\\'q",
    "dbname='with \\'quote\\' and \\\\ backslash' connect_timeout=3",
    "",
]
INVALID = ["foo", "host=a port", "postgresql://u@h/db?nope=1", "dbname='unterminated"]


def test_the_system_libpq_is_used_where_it_is_installed() -> None:
    assert _libpq() is not None


@pytest.mark.parametrize("dsn", VALID)
def test_connection_strings_parse_as_psycopg_parses_them(dsn: str) -> None:
    expected = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    assert dict(ConnectionInfo.parse(dsn).params) == expected


@pytest.mark.parametrize("dsn", INVALID)
def test_a_string_libpq_refuses_is_a_config_error_without_its_text(dsn: str) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        conninfo_to_dict(dsn)
    with pytest.raises(ConfigError) as info:
        ConnectionInfo.parse(dsn + " password=hunter2-secret", source="target 'prod' (DB_PROD)")
    assert "hunter2" not in str(info.value) and "target 'prod'" in str(info.value)


def test_any_password_and_database_name_survive_quoting(pg: LocalCluster) -> None:
    """The keyword string for psycopg and --dbname for the client tools are built by quoting;
    a password or name with quotes, backslashes, spaces and non-ASCII must arrive unchanged."""
    role, password, dbname = "quoting_role", "pa ss'\\wörd=x", "db 'quoted' \\ näme"
    pg.psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    pg.psql(f"DROP ROLE IF EXISTS {role}")
    literal = password.replace("'", "''")
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{literal}'")
    pg.psql(f'CREATE DATABASE "{dbname}" OWNER {role}')
    try:
        base = ConnectionInfo.parse(pg.dsn("postgres"))
        info = ConnectionInfo({**base.params, "user": role, "password": password, "dbname": dbname})
        with connect(info) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == (
                dbname,
                role,
            )
        psql = find_tools(None).path("psql")
        shown = subprocess.run(
            [
                psql,
                "-X",
                "-A",
                "-t",
                "--no-password",
                info.dbname_option(),
                "-c",
                "SELECT current_database()",
            ],
            env=info.child_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert shown == dbname
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        pg.psql(f"DROP ROLE IF EXISTS {role}")


def test_a_connection_service_names_the_database_before_anything_connects(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``service=NAME`` (pg_service.conf) was applied by libpq only: the snapshot's session went
    to another database than pg_dump, and the backup failed."""
    services = tmp_path / "pg_service.conf"
    services.write_text(
        "# ours\n[other]\nhost=elsewhere\n\n[billing]\nhost = db.internal\nport=6432\n"
        "dbname=billing_prod\nuser=backup\npassword=s3cret-from-file\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.delenv("PGSERVICE", raising=False)
    info = ConnectionInfo.parse("service=billing")
    assert info.dbname == "billing_prod"
    assert info.describe() == "backup@db.internal:6432/billing_prod"
    assert info.redact("x s3cret-from-file y") == "x ******** y"
    assert "s3cret" not in str(info)
    # Parameters given explicitly win over the service's, as in libpq.
    assert ConnectionInfo.parse("service=billing dbname=other").dbname == "other"
    monkeypatch.setenv("PGSERVICE", "billing")
    assert ConnectionInfo.parse("postgresql:///").dbname == "billing_prod"
    monkeypatch.delenv("PGSERVICE")
    with pytest.raises(ConfigError, match="names service 'missing'"):
        ConnectionInfo.parse("service=missing", source="target 'x'")


def test_a_backup_through_a_connection_service(
    pg: LocalCluster, tmp_path, make_project, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = ConnectionInfo.parse(pg.dsn("postgres"))
    services = tmp_path / "services.conf"
    services.write_text(
        f"[main]\nhost={info.params['host']}\nport={info.params['port']}\n"
        f"user={info.params['user']}\npassword={info.password}\ndbname=service_db\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    pg.psql("DROP DATABASE IF EXISTS service_db")
    pg.psql("CREATE DATABASE service_db")
    try:
        pg.psql("CREATE TABLE t AS SELECT generate_series(1, 7) AS n", "service_db")
        config = make_project({"svc": {"dsn_env": "SVC_DSN"}}, env={"SVC_DSN": "service=main"})
        result = cli("backup", "svc")
        assert result.returncode == 0, result.stderr
        [meta] = (config.resolved_backup_root / "svc").glob("service_db_*.meta")
        assert '"public.t": 7' in meta.read_text()
    finally:
        pg.psql("DROP DATABASE IF EXISTS service_db WITH (FORCE)")
