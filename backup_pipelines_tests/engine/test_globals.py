"""The server's globals in every backup set, and restoring onto a server that never had the roles.

Cluster A is the ``pg`` fixture; cluster B is a brand-new cluster (a fresh ``initdb``). What
must be identical is compared by querying the catalogs on both sides: content and ownership and
ACLs (pg_dump's full text), default privileges, role attributes, memberships, role settings and
the database's own owner, privileges and settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from backup_pipelines.defs.restore.assets import drill_metadata
from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.devtools.sample_data import SAMPLE_ROLES, create_sample_roles
from backup_pipelines.engine.artifacts import list_artifacts, load_artifact
from backup_pipelines.engine.backup.globals import read_globals_sql
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.drills.fresh_server import choose_drill_mode
from backup_pipelines.engine.drills.logical import run_drill
from backup_pipelines.engine.errors import BackupPipelinesError
from backup_pipelines.engine.offsite import (
    check_offsite_copy,
    offsite_storage,
    sync_offsite,
    upload_backup,
)
from backup_pipelines.engine.restore import restore_database
from backup_pipelines.engine.retention import cleanup_leftovers, prune_target
from backup_pipelines.engine.storage import default_s3_client, list_stored_backups
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import fingerprint, full_dump
from backup_pipelines_tests.pitr_support import chown_to_server_user

log = logging.getLogger("test")


def _roles_sql(roles: list[str]) -> str:
    quoted = ", ".join("'" + r.replace("'", "''") + "'" for r in roles)
    return f"rolname IN ({quoted})"


def _sorted(acl: str) -> str:
    # The order of the items in an ACL is not part of what it grants.
    return f"array(SELECT x::text FROM unnest({acl}) x ORDER BY 1)"


def role_state(cluster: LocalCluster, roles: list[str], dbname: str) -> dict[str, str]:
    """What the server knows about ``roles`` outside any database, as comparable text."""
    where = _roles_sql(roles)
    return {
        "attributes": cluster.psql(
            "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, "
            "rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil, "
            "md5(coalesce(rolpassword, '')) "
            f"FROM pg_authid WHERE {where} ORDER BY 1"
        ),
        "memberships": cluster.psql(
            "SELECT r.rolname, m.rolname, a.admin_option FROM pg_auth_members a "
            "JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member "
            f"WHERE r.{where} OR m.{where} ORDER BY 1, 2"
        ),
        "role_settings": cluster.psql(
            "SELECT r.rolname, coalesce(d.datname, '*'), s.setconfig FROM pg_db_role_setting s "
            "JOIN pg_roles r ON r.oid = s.setrole LEFT JOIN pg_database d ON d.oid = s.setdatabase "
            f"WHERE r.{where} AND (s.setdatabase = 0 OR d.datname = '{dbname}') ORDER BY 1, 2"
        ),
        "database": cluster.psql(
            "SELECT pg_get_userbyid(datdba), " + _sorted("datacl") + ", "
            "(SELECT setconfig FROM pg_db_role_setting WHERE setdatabase = d.oid AND setrole = 0) "
            f"FROM pg_database d WHERE datname = '{dbname}'"
        ),
        "comments": cluster.psql(
            "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
            f"WHERE {where} ORDER BY 1"
        ),
    }


def object_state(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    """Ownership and privileges inside the database, from its catalogs."""
    return {
        "relations": cluster.psql(
            "SELECT n.nspname, c.relname, pg_get_userbyid(c.relowner), "
            + _sorted("c.relacl")
            + " FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN "
            "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
            dbname,
        ),
        "columns": cluster.psql(
            "SELECT attrelid::regclass::text, attname, " + _sorted("attacl") + " FROM pg_attribute "
            "WHERE attacl IS NOT NULL "
            "ORDER BY 1, 2",
            dbname,
        ),
        "schemas": cluster.psql(
            "SELECT nspname, pg_get_userbyid(nspowner), "
            + _sorted("nspacl")
            + " FROM pg_namespace ORDER BY 1",
            dbname,
        ),
        "default_privileges": cluster.psql(
            "SELECT pg_get_userbyid(defaclrole), coalesce(n.nspname, '*'), defaclobjtype, "
            + _sorted("defaclacl")
            + " "
            "FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace "
            "ORDER BY 1, 2, 3",
            dbname,
        ),
        "large_objects": cluster.psql(
            "SELECT oid, pg_get_userbyid(lomowner), "
            + _sorted("lomacl")
            + " FROM pg_largeobject_metadata "
            "ORDER BY 1",
            dbname,
        ),
    }


@pytest.fixture
def app_roles(pg: LocalCluster, sample_db: str) -> Iterator[list[str]]:
    """The sample roles plus a login role with a password, a role setting per database,
    a membership WITH ADMIN OPTION, and the database's own owner, privileges and settings."""
    login = f"bp_app_login_{secrets.token_hex(3)}"
    pg.psql(
        f"CREATE ROLE {login} LOGIN PASSWORD 'app-secret-{login}' CONNECTION LIMIT 7; "
        f"GRANT shiftmanager_app TO {login} WITH ADMIN OPTION; "
        f"COMMENT ON ROLE {login} IS 'the application''s login; line 1\nline 2';"
        f"ALTER ROLE {login} SET work_mem = '12MB'"
    )
    pg.psql(
        f'ALTER DATABASE "{sample_db}" OWNER TO shiftmanager_owner; '
        f'REVOKE CONNECT, TEMPORARY ON DATABASE "{sample_db}" FROM PUBLIC; '
        f'GRANT CONNECT ON DATABASE "{sample_db}" TO {login}, shiftmanager_reader; '
        f'ALTER DATABASE "{sample_db}" SET default_statistics_target = 250; '
        f"ALTER ROLE {login} IN DATABASE \"{sample_db}\" SET lock_timeout = '4s'"
    )
    yield [*SAMPLE_ROLES, login]
    pg.psql(f'DROP DATABASE IF EXISTS "{sample_db}" WITH (FORCE)')
    pg.psql(f"DROP ROLE IF EXISTS {login}")


def _config(make_project, cluster: LocalCluster, db: str, **settings: object):
    return make_project(
        {"prod": {"dsn_env": "DB_PROD", **settings}}, env={"DB_PROD": cluster.dsn(db)}
    )


@pytest.mark.parametrize(("dump_format", "compression"), [("custom", "zstd"), ("plain", "gzip")])
def test_restore_onto_a_brand_new_server_recreates_roles_ownership_acls_and_settings(
    pg: LocalCluster,
    sample_db: str,
    app_roles: list[str],
    make_project,
    dump_format: str,
    compression: str,
) -> None:
    config_a = _config(make_project, pg, sample_db, format=dump_format, compression=compression)
    # A role the new server will already have: the restore must leave it exactly as it is there.
    existing = f"bp_existing_{secrets.token_hex(3)}"
    pg.psql(
        f"CREATE ROLE {existing} NOLOGIN CONNECTION LIMIT 5; "
        f"ALTER ROLE {existing} SET work_mem = '1MB'"
    )
    try:
        backup = run_backup(config_a.target("prod"), log=log)
    finally:
        pg.psql(f"DROP ROLE {existing}")
    entry = backup.meta.globals
    assert entry is not None and entry.role_passwords and entry.roles >= len(app_roles)
    assert backup.globals_path is not None and backup.globals_path.exists()
    assert stat.S_IMODE(backup.globals_path.stat().st_mode) == 0o600
    # The password hashes are in the (0600) globals file, never in the .meta.
    assert "SCRAM-SHA-256$" in read_globals_sql(backup)
    assert "SCRAM-SHA-256" not in backup.meta_path.read_text()

    with throwaway_cluster(password=DB_PASSWORD) as fresh:
        fresh.psql(f"CREATE ROLE {existing} LOGIN CONNECTION LIMIT 2")
        before_existing = role_state(fresh, [existing], sample_db)
        del before_existing["database"]

        config_b = _config(
            make_project, fresh, sample_db, format=dump_format, compression=compression
        )
        report = restore_database(config_b, "prod", str(backup.path), confirm="prod", log=log)

        assert "roles" in report.step_seconds
        assert set(report.roles_created) == set(app_roles)
        assert role_state(fresh, app_roles, sample_db) == role_state(pg, app_roles, sample_db)
        assert object_state(fresh, sample_db) == object_state(pg, sample_db)
        assert fingerprint(fresh, sample_db) == fingerprint(pg, sample_db)
        assert full_dump(fresh, sample_db) == full_dump(pg, sample_db)
        after_existing = role_state(fresh, [existing], sample_db)
        del after_existing["database"]
        assert after_existing == before_existing
        assert report.safety_backup is None  # nothing was there to protect


def test_globals_without_superuser_rights_say_what_they_lack(
    pg: LocalCluster, make_project, cli
) -> None:
    create_sample_roles(pg.dsn())
    backup_role = f"bp_backup_{secrets.token_hex(3)}"
    database = f"{backup_role}_db"
    pg.psql(f"CREATE ROLE {backup_role} LOGIN PASSWORD '{DB_PASSWORD}'")
    pg.psql(f"CREATE DATABASE {database} OWNER {backup_role}")
    try:
        owner = pg.dsn(database, user=backup_role, password=DB_PASSWORD)
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 50) g")
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "format": "custom"}}, env={"DB_PROD": owner}
        )
        backup = run_backup(config.target("prod"), log=log)
        entry = backup.meta.globals
        assert entry is not None
        assert entry.role_passwords is False
        assert entry.role_passwords_reason is not None
        assert "pg_authid" in entry.role_passwords_reason
        assert backup_role in entry.role_passwords_reason
        meta = json.loads(backup.meta_path.read_text())
        assert meta["globals"]["role_passwords"] is False
        text = read_globals_sql(backup)
        assert "CREATE ROLE shiftmanager_owner" in text
        assert "PASSWORD" not in text and "SCRAM" not in text
        outcome = next(o for o in verify_artifact(backup) if o.name == "globals")
        assert outcome.passed and "role passwords NOT included" in outcome.message

        result = cli("verify", str(backup.path))
        assert result.returncode == 0
        assert "role passwords NOT included" in result.stdout
        listing = cli("list", "prod")
        assert "no role passwords" in listing.stdout
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        pg.psql(f"DROP ROLE {backup_role}")


def test_a_damaged_or_missing_globals_file_fails_verification(
    pg: LocalCluster, sample_db: str, make_project, cli
) -> None:
    config = _config(make_project, pg, sample_db, compression="gzip")
    backup = run_backup(config.target("prod"), log=log)
    assert all(o.passed for o in verify_artifact(backup))
    globals_path = backup.globals_path
    assert globals_path is not None
    data = bytearray(globals_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    globals_path.write_bytes(bytes(data))

    damaged = load_artifact(backup.path)
    outcome = next(o for o in verify_artifact(damaged) if o.name == "globals")
    assert not outcome.passed and "globals file" in outcome.message
    result = cli("verify", str(backup.path))
    assert result.returncode == 1
    assert "globals file" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr

    globals_path.unlink()
    missing = load_artifact(backup.path)
    assert "globals file" in (missing.damage or "")  # `list` names it
    outcome = next(o for o in verify_artifact(missing) if o.name == "globals")
    assert not outcome.passed and "missing" in outcome.message


def test_a_backup_whose_globals_cannot_be_captured_leaves_nothing(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    # An installation whose pg_dumpall is missing (a broken client package).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore", "psql"):
        (bin_dir / tool).symlink_to(pg.bin_dir / tool)
    config = _config(make_project, pg, sample_db, pg_bin_dir=str(bin_dir))
    target = config.target("prod")
    with pytest.raises(BackupPipelinesError) as caught:
        run_backup(target, log=log)
    assert "pg_dumpall" in caught.value.message
    assert [p.name for p in target.backup_dir.iterdir() if not p.name.startswith(".")] == []


def test_backups_taken_before_globals_still_list_verify_and_restore(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = _config(make_project, pg, sample_db, format="custom", compression="zstd")
    backup = run_backup(config.target("prod"), log=log)
    assert backup.globals_path is not None
    # What an older version wrote: no globals entry, no globals file.
    for path in (
        backup.globals_path,
        backup.globals_path.with_name(backup.globals_path.name + ".sha256"),
    ):
        path.unlink()
    meta = json.loads(backup.meta_path.read_text())
    del meta["globals"]
    backup.meta_path.write_text(json.dumps(meta))

    old = load_artifact(backup.path)
    assert old.meta.globals is None and old.status == "unverified"
    assert [a.path for a in list_artifacts(backup.path.parent)] == [backup.path]
    outcomes = verify_artifact(old)
    assert all(o.passed for o in outcomes), [o.message for o in outcomes]
    at_backup = fingerprint(pg, sample_db)
    pg.psql("DELETE FROM scheduling.shift", sample_db)
    report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)
    assert fingerprint(pg, sample_db) == at_backup
    assert report.roles_created == []
    pg.psql(f'DROP DATABASE "{report.previous_database}"')


# --- the fresh-server drill ----------------------------------------------------------------------


def _drill_config(make_project, cluster: LocalCluster, db: str, name: str, **drill: object):
    return make_project(
        {
            name: {
                "dsn_env": "DB_PROD",
                "format": "custom",
                "restore": {"drill": drill},
            }
        },
        env={"DB_PROD": cluster.dsn(db)},
    )


def _fresh_drill_dirs(name: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"bp-drill-fresh-{name}-*"))


def test_fresh_server_drill_restores_from_the_backup_set_alone(
    pg: LocalCluster, sample_db: str, app_roles: list[str], make_project, cli
) -> None:
    name = f"fresh{secrets.token_hex(3)}"
    config = _drill_config(make_project, pg, sample_db, name, fresh_server=True)
    run_backup(config.target(name), log=log)

    result = run_drill(config, name, log=log)

    assert result.passed, result.reason
    assert result.mode == "fresh_server"
    assert result.roles_created >= len(app_roles)  # none of them existed on the new cluster
    assert result.tables > 5 and result.rows > 1000
    assert result.amcheck is not None and result.amcheck.indexes_checked >= 10
    assert result.scratch_server == "a throwaway PostgreSQL 15 cluster"
    assert _fresh_drill_dirs(name) == []  # stopped and deleted
    metadata = drill_metadata(result, 3600.0)
    assert metadata["drill_mode"].value == "fresh_server"

    # The same from the command line, and the other mode on request.
    fresh = cli("drill", name, "--fresh-server")
    assert fresh.returncode == 0, fresh.stderr
    assert "restore drill passed (fresh_server)" in fresh.stdout
    same = cli("drill", name, "--same-server")
    assert same.returncode == 0, same.stderr
    assert "restore drill passed (same_server)" in same.stdout
    assert _fresh_drill_dirs(name) == []


def test_fresh_server_drill_fails_clearly_when_the_globals_are_damaged(
    pg: LocalCluster, sample_db: str, make_project, cli
) -> None:
    name = f"fresh{secrets.token_hex(3)}"
    config = _drill_config(make_project, pg, sample_db, name, fresh_server=True)
    backup = run_backup(config.target(name), log=log)
    assert backup.globals_path is not None
    data = bytearray(backup.globals_path.read_bytes())
    data[-10] ^= 0x55
    backup.globals_path.write_bytes(bytes(data))

    result = run_drill(config, name, log=log)

    assert not result.passed and result.mode == "fresh_server"
    assert result.failed_step == "verify"
    assert result.reason is not None and "globals file" in result.reason
    assert _fresh_drill_dirs(name) == []
    failed = cli("drill", name)
    assert failed.returncode == 1
    assert "FAILED at step 'verify'" in failed.stdout and "globals file" in failed.stdout
    assert "Traceback" not in failed.stderr


def test_fresh_server_drill_without_the_servers_binaries(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    name = f"fresh{secrets.token_hex(3)}"
    config = _drill_config(make_project, pg, sample_db, name, fresh_server=True)
    backup = run_backup(config.target(name), log=log)
    # A backup of a server version whose binaries this host does not have.
    meta = json.loads(backup.meta_path.read_text())
    meta["server_version_num"] = 990004
    backup.meta_path.write_text(json.dumps(meta))

    required = run_drill(config, name, log=log)
    assert not required.passed and required.failed_step == "fresh_server"
    assert required.reason is not None and "PostgreSQL 99 server binaries" in required.reason

    auto = _drill_config(make_project, pg, sample_db, name, fresh_server="auto")
    assert choose_drill_mode(auto.target(name), 99, None)[0] == "same_server"
    assert choose_drill_mode(auto.target(name), 15, None)[0] == "fresh_server"
    assert choose_drill_mode(auto.target(name), 15, False)[0] == "same_server"


@contextlib.contextmanager
def _tablespace(cluster: LocalCluster) -> Iterator[str]:
    """A tablespace of ``cluster`` in an empty folder its OS user owns; dropped afterwards."""
    holder = Path(tempfile.mkdtemp(prefix="bp-tablespace-"))
    holder.chmod(0o755)
    folder = holder / "ts"
    folder.mkdir(mode=0o700)
    chown_to_server_user(folder)
    name = f"fast disk {secrets.token_hex(3)}"  # a space: quoted wherever it is named
    cluster.psql(f"CREATE TABLESPACE \"{name}\" LOCATION '{folder}'")
    try:
        yield name
    finally:
        cluster.psql(f'DROP TABLESPACE IF EXISTS "{name}"')
        shutil.rmtree(holder, ignore_errors=True)


def _in_tablespace(cluster: LocalCluster, db: str) -> str:
    return cluster.psql(
        "SELECT string_agg(c.relname || ':' || t.spcname, ',' ORDER BY c.relname) "
        "FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace "
        "WHERE c.relnamespace = 'public'::regnamespace",
        db,
    )


@pytest.mark.parametrize("dump_format", ["plain", "custom"])
def test_a_database_using_a_tablespace_drills_on_a_fresh_server_and_restores_on_a_new_one(
    pg: LocalCluster, make_project, cli, dump_format: str
) -> None:
    """A fresh server has none of the source's tablespaces: the drill creates them in its
    throwaway cluster (no false alarm); a restore onto a new server that lacks one leaves the
    database untouched and says to create it, and restores once it exists."""
    with _tablespace(pg) as space:
        db = f"spaced_{secrets.token_hex(3)}"
        pg.psql(f'CREATE DATABASE "{db}"')
        pg.psql(
            f"""
            CREATE TABLE ledger (id int PRIMARY KEY USING INDEX TABLESPACE "{space}", note text)
                TABLESPACE "{space}";
            CREATE INDEX ledger_note ON ledger (note) TABLESPACE "{space}";
            CREATE TABLE events (at date NOT NULL, kind text) PARTITION BY RANGE (at);
            CREATE TABLE events_2026 PARTITION OF events
                FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') TABLESPACE "{space}";
            CREATE INDEX ON events (kind);
            CREATE TABLE plain_table AS SELECT g AS n FROM generate_series(1, 10) g;
            INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 500) g;
            INSERT INTO events SELECT DATE '2026-01-01' + g % 300, 'k' || g % 7
                FROM generate_series(1, 300) g;
            """,
            db,
        )
        placed = _in_tablespace(pg, db)
        assert "ledger:" in placed and "events_2026:" in placed
        try:
            name = f"spaced{secrets.token_hex(3)}"
            config = make_project(
                {
                    name: {
                        "dsn_env": "DB_PROD",
                        "format": dump_format,
                        "restore": {"drill": {"fresh_server": True}},
                    },
                    "newserver": {"dsn_env": "DB_NEW"},
                },
                env={"DB_PROD": pg.dsn(db), "DB_NEW": "postgresql://unused@localhost/x"},
            )
            backup = run_backup(config.target(name), log=log)
            assert f'CREATE TABLESPACE "{space}"' in read_globals_sql(backup)

            drill = run_drill(config, name, log=log)
            assert drill.passed, drill.reason
            assert drill.mode == "fresh_server" and drill.rows == 810
            assert _fresh_drill_dirs(name) == []

            with throwaway_cluster(password=DB_PASSWORD) as new_server:
                new_server.psql(f'CREATE DATABASE "{db}"')
                new_server.psql(
                    "CREATE TABLE untouched (x int); INSERT INTO untouched VALUES (7)", db
                )
                config = make_project(
                    {name: {"dsn_env": "DB_PROD"}, "newserver": {"dsn_env": "DB_NEW"}},
                    env={"DB_PROD": pg.dsn(db), "DB_NEW": new_server.dsn(db)},
                )
                refused = cli(
                    "restore", str(backup.path), "newserver", "--confirm", "newserver",
                    "--allow-other-database",
                )  # fmt: skip
                assert refused.returncode == 1
                assert f'CREATE TABLESPACE "{space}"' in refused.stderr, refused.stderr
                assert new_server.psql("SELECT x FROM untouched", db) == "7"

                with _tablespace(new_server) as other:
                    new_server.psql(f'ALTER TABLESPACE "{other}" RENAME TO "{space}"')
                    try:
                        restored = cli(
                            "restore", str(backup.path), "newserver", "--confirm", "newserver",
                            "--allow-other-database",
                        )  # fmt: skip
                        assert restored.returncode == 0, restored.stderr
                        assert _in_tablespace(new_server, db) == placed
                        assert fingerprint(new_server, db) == fingerprint(pg, db)
                    finally:
                        new_server.psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                        for left in new_server.psql("SELECT datname FROM pg_database").split():
                            if left.startswith(db):
                                new_server.psql(f'DROP DATABASE "{left}" WITH (FORCE)')
                        new_server.psql(f'ALTER TABLESPACE "{space}" RENAME TO "{other}"')
        finally:
            pg.psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# --- offsite copies, retention and encryption of the globals -------------------------------------


def test_offsite_copy_retention_and_encryption_carry_the_globals(
    pg: LocalCluster, sample_db: str, make_project, aws_env: str
) -> None:
    bucket = f"bp-globals-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=bucket)
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "format": "custom",
                "compression": "zstd",
                "offsite": {"bucket": bucket},
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_GLOBALS_PASS"},
                "retention": {"daily": 1, "weekly": 0, "monthly": 0},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db), "BP_GLOBALS_PASS": "globals " + secrets.token_hex(6)},
    )
    target = config.target("prod")
    older = run_backup(target, log=log)
    newer = run_backup(target, log=log)
    assert older.globals_path is not None and newer.globals_path is not None
    # Encrypted like the dump: no SQL (and no password hash) readable in the stored file.
    assert newer.globals_path.name.endswith(".globals.zst.gpg")
    assert b"ROLE" not in newer.globals_path.read_bytes()
    assert newer.meta.globals is not None and newer.meta.globals.encryption["mode"] == "passphrase"
    assert "CREATE ROLE shiftmanager_owner" in read_globals_sql(newer)

    storage = offsite_storage(target)
    sync_offsite(target, storage)
    names = {o.name for o in storage.list()}
    for backup in (older, newer):
        globals_name = backup.globals_path.name
        assert {globals_name, globals_name + ".sha256"} <= names
    assert check_offsite_copy(newer, storage).passed

    # An offsite copy that lost its globals is incomplete; the next upload completes it.
    storage.delete(newer.globals_path.name)
    outcome = check_offsite_copy(newer, storage)
    assert not outcome.passed and "globals" in outcome.message
    upload_backup(newer, storage)
    assert check_offsite_copy(newer, storage).passed

    # The remote copy verifies on its own, globals decrypted from S3.
    remote = next(a for a in list_stored_backups(storage) if a.path.name == newer.path.name)
    outcomes = verify_artifact(remote)
    assert all(o.passed for o in outcomes), [o.message for o in outcomes]

    for backup in (older, newer):
        for outcome in verify_artifact(backup):
            backup = backup.record_check(outcome.name, outcome.passed, outcome.message)
    report = prune_target(target, storage=storage)
    assert report.errors == []
    assert [e.name for e in report.pruned] == [older.path.name]
    left_local = {p.name for p in target.backup_dir.iterdir() if not p.name.startswith(".")}
    left_remote = {o.name for o in storage.list()}
    for gone in (older.path, *older.sidecars):
        assert gone.name not in left_local and gone.name not in left_remote
    for kept in (newer.path, *newer.sidecars):
        assert kept.name in left_local and kept.name in left_remote

    # A globals file whose backup never got its data file (killed between the two renames)
    # is a leftover, removed by age like the others.
    orphan = target.backup_dir / "shop_20200101_000000.dump.globals.zst.gpg"
    orphan.write_bytes(b"x")
    os.utime(orphan, (0, 0))
    assert cleanup_leftovers(target.backup_dir, 1) == [orphan]
    assert newer.globals_path.exists()
