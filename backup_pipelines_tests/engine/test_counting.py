"""Row counts read from the dump stream: exact, on awkward data, with the source read once."""

from __future__ import annotations

import logging
import subprocess
import time

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.backup.counting import (
    CustomArchiveCounter,
    PlainCopyCounter,
    reconcile_counts,
    stream_counter,
)
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.drills.logical import restore_test
from backup_pipelines.engine.postgres import table_row_counts, tables_with_data
from backup_pipelines_tests.conftest import DB_PASSWORD

log = logging.getLogger("test")

PLAIN = (
    b"--\n-- PostgreSQL database dump\n--\n\nCREATE TABLE x;\n\n"
    b"COPY public.t (a, b) FROM stdin;\n1\tone\n2\t\\\\.\n3\t\\N\n\\.\n\n"
    b'COPY "Sch\xc3\xa9ma ""q""".empty  FROM stdin;\n\\.\n\n'
    b'COPY "Sch\xc3\xa9ma ""q"""."a.b c" ("x y") FROM stdin;\nline\\nwith escapes\n\\.\n\n'
    # Newlines inside quoted names: the header goes on to its closing quote.
    b'COPY public."new\nline" ("col\numn", "x""\n") FROM stdin;\n'
    b"a\nb\\nc\nCOPY public.x (a) FROM stdin;\n\\\\.\n\\.\n\n"
    b"CREATE INDEX i ON public.t (a);\n"
)
PLAIN_COUNTS = {
    "public.t": 3,
    'Schéma "q".empty': 0,
    'Schéma "q".a.b c': 1,
    "public.new\nline": 4,
}


def _fed(counter: PlainCopyCounter | CustomArchiveCounter, data: bytes, size: int) -> object:
    for at in range(0, len(data), size):
        counter.feed(data[at : at + size])
    return counter.result()


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 1 << 20])
def test_plain_copy_blocks_are_counted_across_any_chunk_boundaries(size: int) -> None:
    assert _fed(PlainCopyCounter("utf-8"), PLAIN, size) == PLAIN_COUNTS


# Rows thick with escapes (NULLs, an escaped backslash before a dot, a tab escape): more
# backslashes per buffer than the terminator search probes one by one before it changes method.
ESCAPED_ROWS = b"".join(b"%d\t\\N\t\\N\t\\\\.\t\\.x\t\\t\n" % row for row in range(500))
ESCAPED = (
    b"COPY public.nulls (a, b, c, d, e, f) FROM stdin;\n" + ESCAPED_ROWS + b"\\.\n\n"
    b"COPY public.after (a) FROM stdin;\n\\N\n\\.\n\n"
)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 97, 4096, 1 << 20])
def test_escape_heavy_rows_are_counted_whichever_way_the_end_is_searched_for(size: int) -> None:
    counts = _fed(PlainCopyCounter("utf-8"), ESCAPED, size)
    assert counts == {"public.nulls": 500, "public.after": 1}


def test_a_plain_stream_the_counter_does_not_understand_yields_no_counts() -> None:
    # Cut inside a COPY block, a table twice, a COPY line that is not pg_dump's.
    assert _fed(PlainCopyCounter("utf-8"), PLAIN[:80], 1 << 20) is None
    twice = PLAIN + b"COPY public.t (a, b) FROM stdin;\n4\tfour\n\\.\n"
    assert _fed(PlainCopyCounter("utf-8"), twice, 7) is None
    odd = b"--\nCOPY public.t TO stdout;\n"
    assert _fed(PlainCopyCounter("utf-8"), odd, 3) is None


def test_garbage_is_not_a_custom_archive() -> None:
    assert _fed(CustomArchiveCounter("utf-8"), b"PGDMX" + bytes(100), 7) is None
    assert _fed(CustomArchiveCounter("utf-8"), b"PGDMP", 7) is None


def test_counts_are_reconciled_with_the_tables_the_dump_holds() -> None:
    counted = {"public.t": 3, "ext.config": 2}
    # An extension's configuration table is left out, as count(*) in the snapshot left it out.
    assert reconcile_counts(counted, [("public", "t")]) == {"public.t": 3}
    # A table the stream did not show: the stream was not read as expected.
    assert reconcile_counts(counted, [("public", "t"), ("public", "u")]) is None
    assert reconcile_counts(None, [("public", "t")]) is None


def test_only_streams_pg_dump_did_not_compress_are_counted() -> None:
    assert isinstance(stream_counter("plain", False, "UTF8"), PlainCopyCounter)
    assert isinstance(stream_counter("custom", False, "LATIN1"), CustomArchiveCounter)
    assert stream_counter("custom", True, "UTF8") is None
    assert stream_counter("plain", False, "NO_SUCH_ENCODING") is None


def _pg_dump(pg: LocalCluster, db: str, *args: str) -> bytes:
    return subprocess.run(
        [str(pg.bin_dir / "pg_dump"), *args, "--dbname", pg.dsn(db)],
        capture_output=True,
        check=True,
        env={"PGPASSWORD": DB_PASSWORD, "PATH": "/usr/bin:/bin"},
    ).stdout


@pytest.mark.parametrize("dump_format", ["plain", "custom"])
def test_real_dumps_of_the_awkward_sample_are_counted_exactly(
    pg: LocalCluster, sample_db: str, dump_format: str
) -> None:
    """Partitions, inheritance (each table's own rows), unicode names, large objects, RLS,
    unlogged tables and matviews: the stream's counts equal count(*) table by table."""
    dump = _pg_dump(pg, sample_db, f"--format={dump_format}", "--compress=0")
    with psycopg.connect(ConnectionInfo.parse(pg.dsn(sample_db)).conninfo()) as conn:
        expected = table_row_counts(conn)
        tables = tables_with_data(conn)
    assert expected['Buchhaltung ü.Lohn "Zettel" Ä'] == 30 and len(expected) > 15
    counter_type = PlainCopyCounter if dump_format == "plain" else CustomArchiveCounter
    for size in (3, 5, 64, 4099, 1 << 20):
        counted = _fed(counter_type("utf-8"), dump, size)
        assert reconcile_counts(counted, tables) == expected, size  # type: ignore[arg-type]


def _seq_scans(pg: LocalCluster, db: str) -> dict[str, int]:
    with psycopg.connect(ConnectionInfo.parse(pg.dsn(db)).conninfo()) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || relname, seq_scan FROM pg_stat_user_tables "
            "WHERE relname IN ('employee', 'shift', 'payslip')"
        ).fetchall()
    return {name: int(scans) for name, scans in rows}


@pytest.mark.parametrize(
    ("dump_format", "compression", "scans"),
    [("plain", "zstd", 1), ("plain", "gzip", 1), ("custom", "none", 1), ("custom", "gzip", 2)],
)
def test_the_source_is_scanned_once_unless_pg_dump_compresses(
    pg: LocalCluster,
    sample_db: str,
    make_project,
    dump_format: str,
    compression: str,
    scans: int,
) -> None:
    """Each table is read by pg_dump's COPY and by nothing else; only an archive pg_dump
    compressed itself needs the second, counting scan. The counts are exact either way."""
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "format": dump_format, "compression": compression}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    before = _seq_scans(pg, sample_db)
    artifact = run_backup(config.target("prod"), log=log)
    deadline = time.monotonic() + 10
    while True:  # table statistics reach the view shortly after the backends end
        after = _seq_scans(pg, sample_db)
        if all(after[t] - before[t] >= scans for t in before) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {t: after[t] - before[t] for t in before} == dict.fromkeys(before, scans)

    with psycopg.connect(ConnectionInfo.parse(pg.dsn(sample_db)).conninfo()) as conn:
        assert artifact.meta.row_counts == table_row_counts(conn)
    assert artifact.meta.row_counts_scope == "own"
    result = restore_test(config.target("prod"), artifact, log=log)
    assert result.passed, result.summary()


def test_a_function_that_looks_like_copy_data_falls_back_to_counting_in_the_snapshot(
    pg: LocalCluster, sample_db: str, make_project, caplog: pytest.LogCaptureFixture
) -> None:
    """A function body with a line that reads like pg_dump's COPY header for a real table: the
    stream counts are not trusted, the rows are counted in the dump's snapshot, still exact."""
    pg.psql(
        "SET check_function_bodies = off;\n"
        "CREATE FUNCTION public.tricky() RETURNS void LANGUAGE sql AS $f$\n"
        "COPY hr.employee (id) FROM stdin;\n1\n2\n\\.\n$f$",
        sample_db,
    )
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    with caplog.at_level(logging.WARNING, logger="test"):
        artifact = run_backup(config.target("prod"), log=log)
    assert "counting the rows in the dump's snapshot instead" in caplog.text
    with psycopg.connect(ConnectionInfo.parse(pg.dsn(sample_db)).conninfo()) as conn:
        assert artifact.meta.row_counts == table_row_counts(conn)
    assert artifact.meta.row_counts["hr.employee"] == 300
