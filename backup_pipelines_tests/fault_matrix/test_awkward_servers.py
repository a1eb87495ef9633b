"""Awkward servers: settings made for applications, encodings other than UTF-8, logical
replication on either side.

Each test reproduces a failure a plain test database never shows (backups cut short by a
statement_timeout, a SQL_ASCII database that could not be backed up at all, a subscriber's
scratch copy no drill could drop) and checks what a user relies on: the backup holds every
row, restores to an equal database, the drill tells the truth and the publisher is never
touched.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, standby_of, throwaway_cluster
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.drills.logical import run_drill
from backup_pipelines.engine.postgres import connect
from backup_pipelines.engine.restore import restore_database
from backup_pipelines.engine.restore.database import drop_database
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import restore_and_compare
from backup_pipelines_tests.restore_helpers import database_with, databases, project_for

log = logging.getLogger("test")


# A subscriber database: its publisher (TEST-NET, never reachable) must never be contacted, and
# its slot never dropped, by anything a restore or a drill does.
SUBSCRIBER_SQL = """
CREATE TABLE mirrored (id int PRIMARY KEY, note text);
INSERT INTO mirrored SELECT g, 'row ' || g FROM generate_series(1, 40) g;
CREATE SUBSCRIPTION mirror CONNECTION 'host=192.0.2.1 connect_timeout=2 dbname=prod'
    PUBLICATION everything WITH (connect = false, slot_name = 'prod_mirror_slot');
ALTER SUBSCRIPTION mirror ENABLE;  -- its worker keeps trying to reach the publisher
"""


@pytest.mark.parametrize("dump_format", ["plain", "custom"])
def test_a_subscriber_database_drills_and_restores_without_touching_its_publisher(
    pg: LocalCluster, make_project, dump_format: str
) -> None:
    """PostgreSQL refuses to drop a database that has a subscription: each drill left its
    scratch copy behind and every later drill failed on it. Dropping one the plain way would
    also connect to the publisher and drop the production subscription's slot."""
    with database_with(pg, SUBSCRIBER_SQL) as db:
        try:
            config = project_for(
                make_project, pg, db, format=dump_format, restore={"drill": {"fresh_server": False}}
            )
            backup = run_backup(config.target("prod"), log=log)
            before = databases(pg)

            for _ in range(2):  # the second drill would fail on a copy the first left behind
                drill = run_drill(config, "prod", log=log)
                assert drill.passed, drill.reason
                assert drill.rows == 40 and drill.scratch_dropped
                assert databases(pg) == before

            report = restore_database(config, "prod", str(backup.path), confirm="prod", log=log)
            assert report.rows == 40 and report.previous_database is not None
            previous = report.previous_database
            # The restored database keeps its subscription as pg_dump restores it: disabled,
            # still naming the publisher's slot, ready for the operator to enable. The replaced
            # one's is disabled: it must not go on consuming that slot.
            subscriptions = pg.psql(
                "SELECT d.datname, s.subname, s.subenabled, s.subslotname FROM pg_subscription s "
                "JOIN pg_database d ON d.oid = s.subdbid ORDER BY 1"
            )
            assert f"{db}|mirror|f|prod_mirror_slot" in subscriptions.splitlines()
            assert f"{previous}|mirror|f|prod_mirror_slot" in subscriptions.splitlines()
            drop_database(ConnectionInfo.parse(pg.dsn()), previous)
            assert databases(pg) == before
        finally:
            pg.psql(
                "ALTER SUBSCRIPTION mirror DISABLE; ALTER SUBSCRIPTION mirror SET (slot_name = NONE);"
                " DROP SUBSCRIPTION IF EXISTS mirror",
                db,
                check=False,
            )


@pytest.mark.postgres
def test_a_restore_of_a_publisher_says_its_logical_slots_stay_behind(
    make_project, caplog: pytest.LogCaptureFixture
) -> None:
    """A logical slot belongs to the database it was made in: after an in-place restore its
    subscribers would quietly receive nothing more. The restore says so, naming the slot."""
    with throwaway_cluster(password=DB_PASSWORD, extra_conf={"wal_level": "logical"}) as server:
        server.psql("CREATE DATABASE shop")
        server.psql(
            "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1), (2); "
            "CREATE PUBLICATION shop_pub FOR TABLE orders",
            "shop",
        )
        server.psql(
            "SELECT pg_create_logical_replication_slot('shop_sub_slot', 'pgoutput')", "shop"
        )
        config = make_project({"shop": {"dsn_env": "DB_SHOP"}}, env={"DB_SHOP": server.dsn("shop")})
        backup = run_backup(config.target("shop"), log=log)
        with caplog.at_level(logging.WARNING):
            report = restore_database(config, "shop", str(backup.path), confirm="shop", log=log)
        assert report.previous_database is not None
        assert "shop_sub_slot stay with the replaced database" in caplog.text
        assert (
            server.psql(
                "SELECT database FROM pg_replication_slots WHERE slot_name = 'shop_sub_slot'"
            )
            == report.previous_database
        )
        server.psql("SELECT pg_drop_replication_slot('shop_sub_slot')")


@pytest.mark.parametrize(
    ("encoding", "dump_format"),
    [("SQL_ASCII", "plain"), ("SQL_ASCII", "custom"), ("LATIN1", "plain")],
)
def test_databases_in_other_encodings_back_up_restore_and_drill(
    pg: LocalCluster,
    make_project,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
    dump_format: str,
) -> None:
    """A SQL_ASCII database (bytes without an encoding, still found on old servers) could not
    be backed up at all: its names came back from psycopg as bytes. Names are read one
    character per byte, the same way in the dump stream and in the catalogs."""
    name = f"enc_{secrets.token_hex(4)}"
    pg.psql(
        f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0"
    )
    try:
        # One name written as single LATIN1 bytes (not valid UTF-8), one as UTF-8 by psql.
        with connect(ConnectionInfo.parse(pg.dsn(name)), autocommit=True) as conn:
            conn.execute("SET client_encoding TO 'LATIN1'")
            conn.execute('CREATE TABLE "tåb ü" (id int PRIMARY KEY, note text)')
            conn.execute(
                """INSERT INTO "tåb ü" SELECT g, 'wért ' || g FROM generate_series(1, 30) g"""
            )
        pg.psql(
            'CREATE TABLE "données" (x int); INSERT INTO "données" SELECT generate_series(1, 12)',
            name,
        )
        config = project_for(
            make_project, pg, name, format=dump_format, restore={"drill": {"fresh_server": True}}
        )
        with caplog.at_level(logging.WARNING):
            backup = run_backup(config.target("prod"), log=log)
        assert "could not be read from the dump stream" not in caplog.text
        assert sorted(backup.meta.row_counts.values()) == [12, 30]
        assert "public.tåb ü" in backup.meta.row_counts

        restore_and_compare(pg, name, backup, tmp_path / "work", at_least=2)
        drill = run_drill(config, "prod", log=log)
        assert drill.passed, drill.reason
        assert drill.mode == "fresh_server" and drill.rows == 42
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(("dump_format", "compression"), [("custom", "gzip"), ("plain", "zstd")])
def test_settings_made_for_applications_do_not_break_backups_and_drills(
    pg: LocalCluster, make_project, dump_format: str, compression: str
) -> None:
    """Production databases often set statement_timeout for their applications. Counting the
    rows (in the snapshot when pg_dump compresses), CREATE DATABASE for a drill and the
    drill's own counts on the restored copy (which gets the database's settings) were cut
    short by it: backups failed and drills raised false alarms. Our sessions ignore those
    timeouts, as pg_dump's do. An archive database's default_transaction_read_only refused
    the drill's CREATE DATABASE, and with search_path = '' amcheck was quietly skipped."""
    with database_with(
        pg,
        "CREATE TABLE big (id int PRIMARY KEY, note text); "
        "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 500000) g;",
    ) as db:
        pg.psql(
            f"ALTER DATABASE \"{db}\" SET statement_timeout = '20ms'; "
            f"ALTER DATABASE \"{db}\" SET idle_in_transaction_session_timeout = '500ms'; "
            f'ALTER DATABASE "{db}" SET default_transaction_read_only = on; '
            f"ALTER DATABASE \"{db}\" SET search_path = ''"
        )
        for fresh_server in (False, True):
            config = project_for(
                make_project,
                pg,
                db,
                format=dump_format,
                compression=compression,
                restore={"drill": {"fresh_server": fresh_server}},
            )
            backup = run_backup(config.target("prod"), log=log)
            assert backup.meta.row_counts == {"public.big": 500000}
            drill = run_drill(config, "prod", log=log)
            assert drill.passed, drill.reason
            assert drill.rows == 500000 and drill.mode == (
                "fresh_server" if fresh_server else "same_server"
            )
            assert drill.amcheck is not None and drill.amcheck.indexes_checked == 1


@pytest.mark.postgres
def test_backups_from_a_hot_standby_hold_every_row_and_drill(make_project) -> None:
    """Teams back up from a replica to spare the primary. Every format is taken there (the
    snapshot is exported on the standby); a drill cannot make its scratch database on a
    read-only standby and says what to use instead, and the fresh-server drill passes."""
    with throwaway_cluster(password=DB_PASSWORD) as primary:
        primary.psql("CREATE DATABASE app")
        primary.psql(
            "CREATE TABLE item (id int PRIMARY KEY, note text); "
            "INSERT INTO item SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
            "app",
        )
        with standby_of(primary) as standby:
            deadline = time.monotonic() + 60
            while standby.psql("SELECT count(*) FROM item", "app", check=False) != "5000":
                assert time.monotonic() < deadline, "the standby did not catch up"
                time.sleep(0.2)
            assert standby.psql("SELECT pg_is_in_recovery()") == "t"
            for dump_format in ("plain", "custom", "directory"):
                config = make_project(
                    {"replica": {"dsn_env": "DB_REPLICA", "format": dump_format}},
                    env={"DB_REPLICA": standby.dsn("app")},
                )
                backup = run_backup(config.target("replica"), log=log)
                assert backup.meta.row_counts == {"public.item": 5000}, dump_format
            same = run_drill(config, "replica", log=log, fresh_server=False)
            assert not same.passed and same.failed_step == "create_scratch_database"
            assert "read-only standby" in (same.reason or "")
            fresh = run_drill(config, "replica", log=log, fresh_server=True)
            assert fresh.passed, fresh.reason
            assert fresh.rows == 5000
