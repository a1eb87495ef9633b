"""Awkward databases a backup tool must get right: partitioned and inherited tables, indexes of
every kind, row-level security, large objects, roles, unicode names, extensions.

Each test reproduces a defect the simple sample data never showed (a drill that failed on every
good backup of a database with an indexed partitioned table, row counts that counted inheritance
children twice, counts hidden by row-level security) and checks what a user relies on: the
backup holds every row, restores to an equal database, and the drill tells the truth.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections import Counter

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, throwaway_cluster
from backup_pipelines.devtools.sample_data import (
    SAMPLE_MEMBERSHIPS,
    SAMPLE_ROLES,
    create_sample_database,
    create_sample_roles,
)
from backup_pipelines.engine.artifacts import BackupArtifact, list_artifacts, load_artifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.drills.amcheck import run_amcheck
from backup_pipelines.engine.drills.logical import restore_test, run_drill
from backup_pipelines.engine.errors import BackupFailedError
from backup_pipelines.engine.postgres import table_row_counts
from backup_pipelines.engine.reader import dump_chunks
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import restore_and_compare
from backup_pipelines_tests.restore_helpers import (
    backup_files,
    connect_to,
    database_with,
    databases,
    forge_plain_backup,
    inject_before_first,
    project_for,
)

log = logging.getLogger("test")


_IDENT = r'(?:"(?:[^"]|"")*"|[^".\s(]+)'
_COPY_LINE = re.compile(rf"^COPY ({_IDENT})\.({_IDENT}) (?:\(.*\) )?FROM stdin;$")


def _unquote(identifier: str) -> str:
    if identifier.startswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def rows_in_dump(artifact: BackupArtifact) -> dict[str, int]:
    """Data rows per table in a plain dump, read from its COPY blocks: what a restore loads."""
    counts: Counter[str] = Counter()
    table: str | None = None
    pending = b""
    for chunk in dump_chunks(artifact):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8")
            if table is None:
                match = _COPY_LINE.match(line)
                if match:
                    table = f"{_unquote(match.group(1))}.{_unquote(match.group(2))}"
                    counts[table] += 0
            elif line == "\\.":
                table = None
            else:
                counts[table] += 1
    return dict(counts)


PARTITIONED_SQL = """
CREATE TABLE clock_event (
    id bigserial, occurred_at timestamptz NOT NULL, kind text NOT NULL,
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE clock_event_2025 PARTITION OF clock_event
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY RANGE (occurred_at);
CREATE TABLE clock_event_2025_h1 PARTITION OF clock_event_2025
    FOR VALUES FROM ('2025-01-01') TO ('2025-07-01');
CREATE TABLE clock_event_2025_h2 PARTITION OF clock_event_2025
    FOR VALUES FROM ('2025-07-01') TO ('2026-01-01');
CREATE TABLE clock_event_rest PARTITION OF clock_event DEFAULT;
CREATE INDEX clock_event_kind_idx ON clock_event (kind, occurred_at);
INSERT INTO clock_event (occurred_at, kind)
SELECT TIMESTAMPTZ '2025-01-01 00:00+00' + g * INTERVAL '5 hours', (ARRAY['in','out'])[1 + g % 2]
FROM generate_series(1, 3000) AS g;
"""


def test_drill_passes_on_a_database_with_indexed_partitioned_tables(
    pg: LocalCluster, make_project
) -> None:
    """The weekly drill raised a false "backup not restorable" for every database whose
    partitioned table had a primary key: amcheck was handed the partitioned parent indexes."""
    with database_with(pg, PARTITIONED_SQL) as db:
        config = project_for(make_project, pg, db)
        backup = run_backup(config.target("prod"), log=log)
        before = databases(pg)

        result = run_drill(config, "prod", log=log)

        assert result.passed, result.reason
        assert result.amcheck is not None and result.amcheck.available
        # Leaf partitions only: 3 leaves x (primary key + secondary index).
        assert result.amcheck.indexes_checked == 6 and not result.amcheck.failures
        assert result.rows == backup.meta.total_rows == 3000
        assert result.scratch_dropped and databases(pg) == before


INHERITANCE_SQL = """
CREATE TABLE parent (a int);
CREATE TABLE child () INHERITS (parent);
CREATE TABLE grandchild (b text) INHERITS (child);
INSERT INTO parent VALUES (1), (2);
INSERT INTO child VALUES (10);
INSERT INTO grandchild VALUES (100, 'x'), (101, 'y'), (102, 'z');
"""


@pytest.mark.parametrize("dump_format", ["plain", "custom"])
def test_row_counts_count_each_table_s_own_rows_as_the_dump_holds_them(
    pg: LocalCluster, make_project, dump_format: str
) -> None:
    """``count(*)`` of an inheritance parent includes its children: the .meta said 9 rows for 6."""
    with database_with(pg, INHERITANCE_SQL + PARTITIONED_SQL) as db:
        config = project_for(make_project, pg, db, format=dump_format)
        backup = run_backup(config.target("prod"), log=log)

        counts = backup.meta.row_counts
        assert counts["public.parent"] == 2
        assert counts["public.child"] == 1
        assert counts["public.grandchild"] == 3
        # Partitioned parents hold no rows themselves: only the leaves are counted.
        assert "public.clock_event" not in counts and "public.clock_event_2025" not in counts
        leaves = ("clock_event_2025_h1", "clock_event_2025_h2", "clock_event_rest")
        assert sum(counts[f"public.{leaf}"] for leaf in leaves) == 3000
        assert backup.meta.total_rows == 6 + 3000
        if dump_format == "plain":
            assert rows_in_dump(backup) == counts

        # The restore-side count agrees with the backup's, table by table.
        result = restore_test(config.target("prod"), backup, log=log)
        assert result.passed, result.summary()
        assert result.rows_checked == backup.meta.total_rows
        drill = run_drill(config, "prod", log=log)
        assert drill.passed, drill.reason
        assert drill.rows == backup.meta.total_rows


def test_backups_taken_before_own_row_counts_still_restore_and_drill(
    pg: LocalCluster, make_project
) -> None:
    """A .meta written before ``row_counts_scope`` holds counts with inheritance children; its
    restore check counts the same way instead of reporting a false mismatch."""
    with database_with(pg, INHERITANCE_SQL) as db:
        config = project_for(make_project, pg, db)
        backup = run_backup(config.target("prod"), log=log)
        assert backup.meta.row_counts_scope == "own"
        with connect_to(pg, db) as conn:
            old_style = table_row_counts(conn, with_children=True)
        assert old_style == {"public.parent": 6, "public.child": 4, "public.grandchild": 3}
        document = json.loads(backup.meta_path.read_text())
        del document["row_counts_scope"]
        document["row_counts"] = old_style
        backup.meta_path.write_text(json.dumps(document))
        old = load_artifact(backup.path)
        assert old.meta.row_counts_scope == "with_children"

        result = restore_test(config.target("prod"), old, log=log)
        assert result.passed, result.summary()
        drill = run_drill(config, "prod", log=log)
        assert drill.passed, drill.reason


RLS_SQL = """
CREATE TABLE salary_note (id int PRIMARY KEY, visible_to text NOT NULL, note text);
INSERT INTO salary_note SELECT g, CASE WHEN g % 4 = 0 THEN 'hr' ELSE 'payroll' END, 'note ' || g
FROM generate_series(1, 40) AS g;
ALTER TABLE salary_note ENABLE ROW LEVEL SECURITY;
ALTER TABLE salary_note FORCE ROW LEVEL SECURITY;
CREATE POLICY only_hr ON salary_note FOR SELECT USING (visible_to = 'hr');
"""


def test_row_counts_never_silently_skip_rows_hidden_by_row_level_security(
    pg: LocalCluster,
) -> None:
    """A counting role subject to a policy saw 10 of 40 rows and reported 10; pg_dump (which
    turns row_security off) would have dumped all 40 or failed. Counting must do the same."""
    role = f"reader_{secrets.token_hex(3)}"
    with database_with(pg, RLS_SQL) as db:
        pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}' IN ROLE pg_read_all_data")
        try:
            with connect_to(pg, db) as conn:
                assert table_row_counts(conn) == {"public.salary_note": 40}
            dsn = pg.dsn(db, user=role, password=DB_PASSWORD)
            with (
                psycopg.connect(dsn) as conn,
                pytest.raises(psycopg.Error, match="row-level security"),
            ):
                table_row_counts(conn)
        finally:
            pg.psql(f"DROP ROLE IF EXISTS {role}")


AMCHECK_SQL = (
    PARTITIONED_SQL
    + """
CREATE SCHEMA tools;
CREATE EXTENSION amcheck SCHEMA tools;
CREATE EXTENSION pg_trgm;
CREATE TABLE doc (id int PRIMARY KEY, code text, body text, n int);
INSERT INTO doc SELECT g, 'C' || g, repeat(md5(g::text), 300), g % 7 FROM generate_series(1, 200) g;
INSERT INTO doc VALUES (201, 'C1', 'a duplicate code', 1);
CREATE INDEX doc_code ON doc (code);
CREATE UNIQUE INDEX doc_id_n ON doc (id) INCLUDE (n);
CREATE INDEX doc_lower_code ON doc (lower(code));
CREATE INDEX doc_partial ON doc (n) WHERE n > 3;
CREATE INDEX doc_hash ON doc USING hash (code);
CREATE INDEX doc_brin ON doc USING brin (id);
CREATE INDEX doc_trgm ON doc USING gin (code gin_trgm_ops);
CREATE UNLOGGED TABLE cache (k text PRIMARY KEY, v text);
INSERT INTO cache SELECT g::text, 'v' FROM generate_series(1, 50) g;
CREATE MATERIALIZED VIEW doc_stats AS SELECT n, count(*) AS c FROM doc GROUP BY n;
CREATE UNIQUE INDEX doc_stats_n ON doc_stats (n);
CREATE MATERIALIZED VIEW doc_later AS SELECT id, code FROM doc WITH NO DATA;
CREATE INDEX doc_later_id ON doc_later (id);
"""
)


def test_amcheck_checks_every_leaf_btree_index_and_nothing_it_cannot(pg: LocalCluster) -> None:
    """No index kind or unusual object may produce a false amcheck failure: partitioned parent
    indexes, hash/BRIN/GIN indexes, an invalid index, another session's temporary table, an
    unpopulated materialized view, amcheck installed in a schema off the search_path."""
    with database_with(pg, AMCHECK_SQL) as db:
        # A failed CREATE INDEX CONCURRENTLY leaves an invalid index behind.
        with (
            connect_to(pg, db, autocommit=True) as conn,
            pytest.raises(psycopg.errors.UniqueViolation),
        ):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY doc_code_invalid ON doc (code)")
        with connect_to(pg, db, autocommit=True) as other:
            other.execute("CREATE TEMP TABLE scratch (x int PRIMARY KEY)")
            with connect_to(pg, db, autocommit=True) as conn:
                outcome = run_amcheck(conn)
        assert outcome.available, outcome.detail
        assert not outcome.failures, outcome.detail
        # 3 leaf partitions x 2 indexes; doc: pkey, code, id_n, lower, partial; cache; doc_stats.
        assert outcome.indexes_checked == 13, outcome.detail

        pg.psql("REFRESH MATERIALIZED VIEW doc_later", db)
        with connect_to(pg, db, autocommit=True) as conn:
            populated = run_amcheck(conn)
        assert populated.indexes_checked == 14 and not populated.failures, populated.detail


def test_an_index_that_does_not_match_its_table_still_fails_the_drill(
    pg: LocalCluster, make_project
) -> None:
    """Honest results: a restored index amcheck finds broken fails the drill at 'amcheck'."""
    statements = """
    CREATE FUNCTION f(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';
    CREATE TABLE t (a int PRIMARY KEY);
    INSERT INTO t SELECT generate_series(1, 500);
    CREATE INDEX t_f ON t (f(a));
    """
    with database_with(pg, statements) as db:
        config = project_for(make_project, pg, db)
        backup = run_backup(config.target("prod"), log=log)
        # After the restore built t_f, the "immutable" function changes its answers.
        forged = forge_plain_backup(
            backup,
            inject_before_first(
                b"-- PostgreSQL database dump complete",
                b"CREATE OR REPLACE FUNCTION public.f(integer) RETURNS integer IMMUTABLE "
                b"LANGUAGE sql AS 'SELECT -$1';\n",
            ),
        )
        result = run_drill(config, "prod", log=log, backup=str(forged))
        assert not result.passed and result.failed_step == "amcheck", result.reason
        assert result.amcheck is not None and list(result.amcheck.failures) == ["t_f"]
        assert "t_f" in (result.reason or "") and result.scratch_dropped


# --- the sample database (demo, tests, benchmarks) is awkward on purpose ---------------------


@pytest.mark.postgres
def test_sample_roles_are_created_once_even_by_concurrent_processes() -> None:
    """Roles belong to the cluster: several sample databases created at once, or one after
    another, share them without a "role already exists" failure."""
    with throwaway_cluster(password=DB_PASSWORD) as cluster:
        errors: list[BaseException] = []

        def create(index: int) -> None:
            try:
                create_sample_database(cluster.dsn(), f"sample_{index}", employees=20, shifts=50)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        create_sample_roles(cluster.dsn())
        create_sample_database(cluster.dsn(), "sample_0", employees=20, shifts=50)
        roles = cluster.psql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'shiftmanager%'")
        assert sorted(roles.splitlines()) == sorted(SAMPLE_ROLES)
        members = cluster.psql(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "WHERE r.rolname LIKE 'shiftmanager%'"
        )
        assert members == str(len(SAMPLE_MEMBERSHIPS))


def test_the_sample_database_holds_every_awkward_object(pg: LocalCluster, sample_db: str) -> None:
    with connect_to(pg, sample_db) as conn:

        def one(query: str) -> object:
            row = conn.execute(query).fetchone()
            assert row is not None
            return row[0]

        assert one("SELECT count(*) FROM pg_class WHERE relkind = 'I'") >= 4
        assert (
            one(
                "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE c.relkind = 'p'"
            )
            >= 1
        )  # a sub-partitioned partition
        assert (
            one("SELECT count(*) FROM pg_class WHERE relrowsecurity AND relforcerowsecurity") >= 1
        )
        assert one("SELECT count(*) FROM pg_largeobject_metadata") >= 3
        assert (
            one(
                "SELECT count(*) FROM pg_largeobject_metadata m JOIN pg_roles r ON r.oid = m.lomowner "
                "WHERE NOT r.rolsuper AND m.lomacl IS NOT NULL"
            )
            >= 1
        )
        assert (
            one(
                "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                "WHERE NOT r.rolsuper AND c.relkind IN ('r', 'p')"
            )
            >= 2
        )
        assert one("SELECT count(*) FROM pg_default_acl") >= 2
        assert (
            one(
                "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                "WHERE r.rolname LIKE 'shiftmanager%'"
            )
            >= 2
        )
        assert one("SELECT count(*) FROM pg_namespace WHERE nspname ~ '[^\\x01-\\x7f]'") >= 1
        assert one("SELECT count(*) FROM pg_class WHERE relname LIKE '%\"%' AND relkind = 'r'") >= 1
        assert one("SELECT count(*) FROM pg_attribute WHERE attname ~ '[^\\x01-\\x7f]'") >= 2
        assert (
            one(
                "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                "WHERE c.relkind = 'm'"
            )
            >= 2
        )
        assert one("SELECT count(*) FROM pg_class WHERE relkind = 'm' AND NOT relispopulated") >= 1
        extensions = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
        assert {"citext", "pg_trgm", "amcheck"} <= extensions
        assert (
            one(
                "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent "
                "WHERE c.relkind = 'r'"
            )
            >= 2
        )
        assert (
            one("SELECT count(*) FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r'") >= 1
        )


@pytest.mark.parametrize(("dump_format", "compression"), [("plain", "gzip"), ("custom", "zstd")])
def test_the_awkward_sample_database_round_trips_and_drills(
    pg: LocalCluster, sample_db: str, make_project, tmp_path, dump_format: str, compression: str
) -> None:
    config = project_for(make_project, pg, sample_db, format=dump_format, compression=compression)
    backup = run_backup(config.target("prod"), log=log)

    counts = backup.meta.row_counts
    assert counts["scheduling.note"] == 7  # its own rows, not its children's 33 besides
    assert counts["scheduling.shift_note"] == 20 and counts["scheduling.employee_note"] == 13
    assert counts["payroll.salary_note"] == 60  # every row, not what the policy shows
    assert counts['Buchhaltung ü.Lohn "Zettel" Ä'] == 30
    assert counts["scheduling.session_cache"] == 25  # unlogged tables are dumped too
    assert "scheduling.clock_event" not in counts and "scheduling.clock_event_2025" not in counts
    if dump_format == "plain":
        assert rows_in_dump(backup) == counts

    # Equal content, large objects with their owners, grants and comments included.
    restore_and_compare(pg, sample_db, backup, tmp_path / "work")

    drill = run_drill(config, "prod", log=log)
    assert drill.passed, drill.reason
    assert drill.rows == backup.meta.total_rows and drill.tables == len(counts)
    assert drill.amcheck is not None and drill.amcheck.available
    assert drill.amcheck.indexes_checked >= 30 and not drill.amcheck.failures


def test_a_drill_server_without_the_source_roles_says_what_is_missing(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    """pg_dump does not carry roles: on a drill server without them the restore fails, and
    the drill says which role is missing and how to bring the roles over."""
    with throwaway_cluster(password=DB_PASSWORD) as drill_server:
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "scratch_dsn_env": "DB_DRILL"}},
            env={"DB_PROD": pg.dsn(sample_db), "DB_DRILL": drill_server.dsn()},
        )
        run_backup(config.target("prod"), log=log)
        before = databases(drill_server)

        missing = run_drill(config, "prod", log=log)
        assert not missing.passed and missing.failed_step == "restore"
        assert re.search(r'role "shiftmanager[^"]*" does not exist', missing.reason or "")
        assert "pg_dumpall --roles-only" in (missing.reason or "")
        assert missing.scratch_dropped and databases(drill_server) == before

        create_sample_roles(drill_server.dsn())
        present = run_drill(config, "prod", log=log)
        assert present.passed, present.reason


def test_a_backup_role_row_level_security_would_restrict_fails_clearly(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    """pg_dump refuses to dump a table a policy would filter for its role; the message says
    how to fix it, and nothing that looks like a backup is left."""
    role = f"backup_{secrets.token_hex(3)}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}' IN ROLE pg_read_all_data")
    try:
        pg.psql(
            "DO $$ DECLARE o oid; BEGIN FOR o IN SELECT oid FROM pg_largeobject_metadata LOOP "
            f"EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO {role}', o); END LOOP; END $$",
            sample_db,
        )
        config = make_project(
            {"prod": {"dsn_env": "DB_PROD", "scratch_dsn_env": "DB_SCRATCH"}},
            env={
                "DB_PROD": pg.dsn(sample_db, user=role, password=DB_PASSWORD),
                "DB_SCRATCH": pg.dsn(),
            },
        )
        with pytest.raises(BackupFailedError) as info:
            run_backup(config.target("prod"), log=log)
        assert "row-level security" in info.value.message and "salary_note" in info.value.message
        assert "BYPASSRLS" in (info.value.hint or "")
        folder = config.target("prod").backup_dir
        assert not list_artifacts(folder) and backup_files(folder) == []

        pg.psql(f"ALTER ROLE {role} BYPASSRLS")
        backup = run_backup(config.target("prod"), log=log)
        assert backup.meta.row_counts["payroll.salary_note"] == 60
        result = restore_test(config.target("prod"), backup, log=log)
        assert result.passed, result.summary()
    finally:
        pg.psql(f"DROP OWNED BY {role}", sample_db)
        pg.psql(f"DROP ROLE IF EXISTS {role}")
