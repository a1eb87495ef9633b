"""Restore drills against real PostgreSQL servers: the drill server, S3 copies, amcheck, failures."""

from __future__ import annotations

import logging
import secrets

from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.devtools.sample_data import create_sample_roles
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.drills.amcheck import run_amcheck
from backup_pipelines.engine.drills.logical import run_drill
from backup_pipelines.engine.offsite import upload_backup
from backup_pipelines.engine.restore.locate import configured_offsite_storage
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import connect_to, databases

log = logging.getLogger("test")


def test_drill_on_separate_drill_server_never_touches_production(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    with throwaway_cluster(password=DB_PASSWORD) as drill_server:
        # Like any server a backup is restored on, the drill server has the source's roles.
        create_sample_roles(drill_server.dsn())
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "scratch_dsn_env": "DB_DRILL"}},
            env={"DB_PROD": pg.dsn(sample_db), "DB_DRILL": drill_server.dsn()},
        )
        run_backup(config.target("prod"), log=log)
        prod_dbs, drill_dbs = databases(pg), databases(drill_server)
        before_fp = fingerprint(pg, sample_db)

        result = run_drill(config, "prod", log=log)

        assert result.passed, result.reason
        assert result.scratch_server == f"postgres@127.0.0.1:{drill_server.port}"
        assert result.scratch_dropped and databases(drill_server) == drill_dbs
        assert databases(pg) == prod_dbs and fingerprint(pg, sample_db) == before_fp
        assert result.amcheck is not None and result.amcheck.available
        assert result.amcheck.indexes_checked >= 10 and not result.amcheck.failures


def test_drill_reads_the_offsite_copy_when_there_is_one(
    pg: LocalCluster, sample_db: str, make_project, aws_env: str
) -> None:
    bucket = f"bp-drill-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=bucket)
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "format": "custom",
                "compression": "zstd",
                "offsite": {"bucket": bucket},
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_DRILL_PASS"},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db), "BP_DRILL_PASS": "drill " + secrets.token_hex(6)},
    )
    target = config.target("prod")
    backup = run_backup(target, log=log)

    local = run_drill(config, "prod", log=log)
    assert local.passed and local.source == "local" and local.backup == str(backup.path)

    storage = configured_offsite_storage(target)
    assert storage is not None
    location = upload_backup(backup, storage).url
    remote = run_drill(config, "prod", log=log)
    assert remote.passed, remote.reason
    assert remote.source == "s3" and remote.backup == location
    assert remote.rows == backup.meta.total_rows


def test_drill_of_corrupt_backup_fails_at_verify(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    backup = run_backup(config.target("prod"), log=log)
    with backup.path.open("r+b") as handle:
        handle.seek(backup.meta.size_bytes // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    before = databases(pg)

    result = run_drill(config, "prod", log=log)

    assert not result.passed and result.failed_step == "verify"
    assert "SHA-256 mismatch" in (result.reason or "")
    assert result.rto_seconds is None and databases(pg) == before
    assert "FAILED at step 'verify'" in result.summary()


def test_drill_without_any_backup_fails_clearly(pg: LocalCluster, make_project) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn()})
    result = run_drill(config, "prod", log=log)
    assert not result.passed and result.failed_step == "locate"
    assert "no usable backup" in (result.reason or "")


def test_amcheck_finds_a_corrupt_btree_index(pg: LocalCluster) -> None:
    """An expression index whose 'immutable' function changed no longer matches the heap."""
    name = f"amcheck_{secrets.token_hex(3)}"
    pg.psql(f'CREATE DATABASE "{name}"')
    try:
        pg.psql(
            "CREATE FUNCTION f(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';"
            "CREATE TABLE t (a int); INSERT INTO t SELECT generate_series(1, 500);"
            "CREATE INDEX t_f ON t (f(a)); CREATE INDEX t_a ON t (a);",
            name,
        )
        with connect_to(pg, name, autocommit=True) as conn:
            healthy = run_amcheck(conn)
        assert healthy.available and healthy.indexes_checked == 2 and not healthy.failures
        pg.psql(
            "CREATE OR REPLACE FUNCTION f(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT -$1'",
            name,
        )
        with connect_to(pg, name, autocommit=True) as conn:
            broken = run_amcheck(conn)
        assert list(broken.failures) == ["t_f"]
        assert "t_f" in broken.detail and "failed on 1 of 2" in broken.detail
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_amcheck_unavailable_is_reported_not_failed(pg: LocalCluster) -> None:
    """A drill role that may not create the extension still gets a drill, with a note."""
    name = f"amcheck_{secrets.token_hex(3)}"
    role = f"drill_{secrets.token_hex(3)}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}'")
    pg.psql(f'CREATE DATABASE "{name}" OWNER {role}')
    try:
        with connect_to_as(pg, name, role) as conn:
            outcome = run_amcheck(conn)
        assert not outcome.available and "amcheck unavailable" in outcome.detail
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        pg.psql(f"DROP ROLE IF EXISTS {role}")


def connect_to_as(cluster: LocalCluster, dbname: str, role: str):
    import psycopg

    from backup_pipelines.engine.conninfo import ConnectionInfo

    dsn = cluster.dsn(dbname, user=role, password=DB_PASSWORD)
    return psycopg.connect(ConnectionInfo.parse(dsn).conninfo(), autocommit=True)
