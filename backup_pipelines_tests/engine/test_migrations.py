"""Migration rollback against a real PostgreSQL, with a realistic drizzle-kit history."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import load_artifact
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.confirm import ConfirmationError
from backup_pipelines.engine.errors import ConfigError
from backup_pipelines.engine.migrations.errors import RollbackFailedError, RollbackRefusedError
from backup_pipelines.engine.migrations.journal import (
    MigrationsFolder,
    TrackingTable,
    drizzle_hash,
    legacy_drizzle_hash,
    split_statements,
)
from backup_pipelines.engine.migrations.plan import plan_rollback
from backup_pipelines.engine.migrations.rollback import execute_rollback
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.migration_support import (
    FIXTURE_HISTORY,
    HISTORY_LENGTH,
    app_project,
    conninfo,
    copy_history,
    create_database,
    drop_database,
    history_dumps,
    migrate,
    query,
    realistic_app_database,
    schema_dump,
    tracking_rows,
)

DSN_ENV = "BP_TEST_APP_DB"


@pytest.fixture(scope="module")
def history(pg: LocalCluster) -> list[str]:
    """Schema dumps of the fixture history at every point (index K: first K migrations)."""
    return history_dumps(pg)


@pytest.fixture
def app_db(pg: LocalCluster):
    with realistic_app_database(pg) as name:
        yield name


def project_for(make_project, pg: LocalCluster, dbname: str, folder: Path, **migrations):
    return app_project(make_project, pg, dbname, DSN_ENV, folder, **migrations)


def backups_of(target: Target) -> list[Path]:
    if not target.backup_dir.exists():
        return []
    return sorted(p for p in target.backup_dir.iterdir() if p.name.endswith(".sql.gz"))


# --- drizzle compatibility --------------------------------------------------------------------


def test_applies_and_records_exactly_like_drizzle(pg: LocalCluster, app_db: str) -> None:
    journal = json.loads((FIXTURE_HISTORY / "meta" / "_journal.json").read_text())
    expected = [
        (
            position + 1,
            # drizzle-orm: crypto.createHash("sha256").update(fileText).digest("hex")
            hashlib.sha256((FIXTURE_HISTORY / f"{entry['tag']}.sql").read_bytes()).hexdigest(),
            entry["when"],
        )
        for position, entry in enumerate(journal["entries"])
    ]
    assert tracking_rows(pg, app_db) == expected
    columns = query(
        pg,
        app_db,
        "SELECT column_name, data_type, is_nullable, column_default FROM "
        "information_schema.columns WHERE table_schema = 'drizzle' AND "
        "table_name = '__drizzle_migrations' ORDER BY ordinal_position",
    )
    assert [c[:3] for c in columns] == [
        ("id", "integer", "NO"),
        ("hash", "text", "NO"),
        ("created_at", "bigint", "YES"),
    ]
    assert "nextval" in columns[0][3]
    # Application data went through the data migration 0005.
    assert query(pg, app_db, "SELECT count(*) FROM shifts_archive")[0][0] == 10
    assert query(pg, app_db, "SELECT count(*) FROM shifts WHERE status = 'cancelled'")[0][0] == 0


def test_hashes_and_statement_splitting() -> None:
    text = 'CREATE TABLE "a" (id int);--> statement-breakpoint\r\nSELECT 1;\r\n'
    assert drizzle_hash(text) == hashlib.sha256(text.replace("\r\n", "\n").encode()).hexdigest()
    assert legacy_drizzle_hash(text) == hashlib.sha256(text.encode()).hexdigest()
    assert split_statements(text) == ['CREATE TABLE "a" (id int);', "\nSELECT 1;\n"]
    assert split_statements("\n--> statement-breakpoint\n  \n") == []
    folder = MigrationsFolder.load(FIXTURE_HISTORY)
    assert [m.tag for m in folder.migrations][:2] == ["0000_initial_schema", "0001_departments"]
    assert len(folder.migrations[0].up_statements()) == 5


# --- successful rollbacks ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_rollback_restores_the_schema_of_that_point_in_history(
    pg: LocalCluster, app_db: str, history: list[str], make_project, steps: int
) -> None:
    config: ProjectConfig = project_for(make_project, pg, app_db, FIXTURE_HISTORY)
    target = config.target("app")
    rows_before = tracking_rows(pg, app_db)
    assert schema_dump(pg, app_db) == history[HISTORY_LENGTH]

    plan = plan_rollback(target, steps)
    assert [s.tag for s in plan.steps] == [
        "0005_archive_cancelled_shifts",
        "0004_shift_swaps",
        "0003_shift_status_no_show",
    ][:steps]
    result = execute_rollback(target, plan, confirm="app")

    remaining = HISTORY_LENGTH - steps
    assert schema_dump(pg, app_db) == history[remaining]
    assert tracking_rows(pg, app_db) == rows_before[:remaining]
    assert result.rolled_back == [s.tag for s in plan.steps]
    assert [e.tag for e in result.after] == [e.tag for e in plan.applied[:remaining]]

    # The archived (cancelled) shifts are back in the table: the data change was undone too.
    assert query(pg, app_db, "SELECT count(*) FROM shifts")[0][0] == 40
    statuses = dict(query(pg, app_db, "SELECT status::text, count(*) FROM shifts GROUP BY 1"))
    if steps == 1:
        assert statuses == {"scheduled": 10, "completed": 10, "cancelled": 10, "no_show": 10}
    else:  # 0003's down maps no_show to cancelled before dropping the enum value
        assert statuses == {"scheduled": 10, "completed": 10, "cancelled": 20}

    # The safety backup is real, was taken before the rollback, and says why it exists.
    backup = load_artifact(result.backup.path)
    assert backup.meta.purpose == "pre-rollback"
    assert "public.shifts_archive" in backup.meta.row_counts
    assert backups_of(target) == [result.backup.path]


def test_every_down_migration_undoes_its_migration(
    pg: LocalCluster, app_db: str, history: list[str], make_project
) -> None:
    """Roll back one step at a time to the empty history; each point equals a fresh build."""
    target = project_for(make_project, pg, app_db, FIXTURE_HISTORY).target("app")
    for remaining in range(HISTORY_LENGTH - 1, -1, -1):
        execute_rollback(target, plan_rollback(target, 1), confirm="app")
        assert schema_dump(pg, app_db) == history[remaining], f"after rolling back to {remaining}"
    assert tracking_rows(pg, app_db) == []
    with pytest.raises(RollbackRefusedError, match="nothing to roll back"):
        plan_rollback(target, 1)


def test_custom_tracking_table(pg: LocalCluster, make_project) -> None:
    table = TrackingTable("app_meta", "schema_history")
    name = create_database(pg)
    try:
        migrate(pg, name, upto=3, table=table)
        target = project_for(
            make_project,
            pg,
            name,
            FIXTURE_HISTORY,
            table_schema="app_meta",
            table_name="schema_history",
        ).target("app")
        result = execute_rollback(target, plan_rollback(target, 2), confirm="app")
        assert result.rolled_back == ["0002_employee_contact_and_rate", "0001_departments"]
        assert len(tracking_rows(pg, name, table)) == 1
        assert query(pg, name, "SELECT to_regclass('public.departments')") == [(None,)]
    finally:
        drop_database(pg, name)


# --- refusals: nothing is touched -------------------------------------------------------------


def assert_untouched(pg: LocalCluster, dbname: str, target: Target, before: tuple) -> None:
    assert (schema_dump(pg, dbname), tracking_rows(pg, dbname), fingerprint(pg, dbname)) == before
    assert backups_of(target) == []


def snapshot(pg: LocalCluster, dbname: str) -> tuple:
    return schema_dump(pg, dbname), tracking_rows(pg, dbname), fingerprint(pg, dbname)


@pytest.mark.parametrize("steps", [0, -1, HISTORY_LENGTH + 1])
def test_refuses_a_step_count_outside_the_applied_history(
    pg: LocalCluster, app_db: str, make_project, steps: int
) -> None:
    target = project_for(make_project, pg, app_db, FIXTURE_HISTORY).target("app")
    before = snapshot(pg, app_db)
    with pytest.raises(RollbackRefusedError) as caught:
        plan_rollback(target, steps)
    assert f"cannot roll back {steps} migration(s): {HISTORY_LENGTH} are applied" in str(
        caught.value
    )
    assert caught.value.exit_code == 2
    assert_untouched(pg, app_db, target, before)


def test_refuses_when_a_down_file_is_missing(
    pg: LocalCluster, app_db: str, make_project, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    (folder / "0004_shift_swaps.down.sql").unlink()
    target = project_for(make_project, pg, app_db, folder).target("app")
    before = snapshot(pg, app_db)
    plan_rollback(target, 1)  # 0005 alone is fine
    with pytest.raises(RollbackRefusedError) as caught:
        plan_rollback(target, 2)
    message = str(caught.value)
    assert "0004_shift_swaps: down migration" in message and "is missing" in message
    assert "nothing was touched" in message
    assert_untouched(pg, app_db, target, before)


def test_refuses_when_an_applied_migration_was_edited(
    pg: LocalCluster, app_db: str, make_project, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    edited = folder / "0003_shift_status_no_show.sql"
    edited.write_text(edited.read_text() + "\n-- tweaked after deploy\n")
    target = project_for(make_project, pg, app_db, folder).target("app")
    before = snapshot(pg, app_db)
    plan = plan_rollback(target, 2)  # 0005 and 0004 are unaffected; the edit is reported
    assert any("0003_shift_status_no_show" in w for w in plan.warnings)
    with pytest.raises(
        RollbackRefusedError, match="0003_shift_status_no_show.sql was edited after"
    ):
        plan_rollback(target, 3)
    assert_untouched(pg, app_db, target, before)


def test_accepts_hashes_recorded_by_older_drizzle_releases(
    pg: LocalCluster, make_project, tmp_path: Path
) -> None:
    """drizzle-orm <= 0.45 hashed the text as read; newer ones normalise CRLF first."""
    folder = copy_history(tmp_path / "drizzle")
    crlf = folder / "0001_departments.sql"
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    name = create_database(pg)
    try:
        migrate(pg, name, folder, upto=2)
        with psycopg.connect(conninfo(pg, name)) as conn:
            conn.execute(
                "UPDATE drizzle.__drizzle_migrations SET hash = %s WHERE id = 2",
                (hashlib.sha256(crlf.read_bytes()).hexdigest(),),
            )
        target = project_for(make_project, pg, name, folder).target("app")
        assert [s.tag for s in plan_rollback(target, 1).steps] == ["0001_departments"]
    finally:
        drop_database(pg, name)


def test_refuses_rows_the_journal_does_not_know(
    pg: LocalCluster, app_db: str, make_project
) -> None:
    with psycopg.connect(conninfo(pg, app_db)) as conn:
        conn.execute(
            "INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ('abc', %s)",
            (1999999999999,),
        )
    target = project_for(make_project, pg, app_db, FIXTURE_HISTORY).target("app")
    with pytest.raises(RollbackRefusedError, match="matches no journal entry"):
        plan_rollback(target, 1)


def test_refuses_down_files_that_end_the_transaction(
    pg: LocalCluster, app_db: str, make_project, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    down = folder / "0005_archive_cancelled_shifts.down.sql"
    down.write_text("COMMIT;\n--> statement-breakpoint\n" + down.read_text())
    target = project_for(make_project, pg, app_db, folder).target("app")
    with pytest.raises(RollbackRefusedError, match="would break the single transaction"):
        plan_rollback(target, 1)


@pytest.mark.parametrize("given", [None, "production"])
def test_refuses_without_confirmation(
    pg: LocalCluster, app_db: str, make_project, given: str | None
) -> None:
    target = project_for(make_project, pg, app_db, FIXTURE_HISTORY).target("app")
    before = snapshot(pg, app_db)
    plan = plan_rollback(target, 2)
    with pytest.raises(ConfirmationError, match="nothing was touched"):
        execute_rollback(target, plan, confirm=given)
    assert_untouched(pg, app_db, target, before)
    # A person at a terminal typing the right name is enough.
    asked = []
    execute_rollback(target, plan, confirm=None, prompt=lambda q: asked.append(q) or "app")
    assert "roll back 2 migration(s)" in asked[0]
    assert len(tracking_rows(pg, app_db)) == HISTORY_LENGTH - 2


def test_refuses_without_migrations_configured(pg: LocalCluster, app_db: str, make_project) -> None:
    config = make_project({"app": {"dsn_env": DSN_ENV}}, env={DSN_ENV: pg.dsn(app_db)})
    with pytest.raises(ConfigError, match="has no migrations configured"):
        plan_rollback(config.target("app"), 1)


def test_relative_folder_resolves_against_the_targets_file(make_project, tmp_path: Path) -> None:
    config = make_project({"app": {"dsn_env": DSN_ENV, "migrations": {"folder": "db/drizzle"}}})
    assert config.target("app").migrations_folder == (tmp_path / "db" / "drizzle").resolve()
    assert config.targets["app"].migrations.table_schema == "drizzle"
    assert config.targets["app"].migrations.table_name == "__drizzle_migrations"


def test_refuses_when_a_migration_ran_after_planning(pg: LocalCluster, make_project) -> None:
    name = create_database(pg)
    try:
        migrate(pg, name, upto=4)
        target = project_for(make_project, pg, name, FIXTURE_HISTORY).target("app")
        plan = plan_rollback(target, 1)
        migrate(pg, name, upto=5)  # a deploy sneaks in between plan and execution
        before = snapshot(pg, name)
        with pytest.raises(RollbackRefusedError, match="changed since the rollback was planned"):
            execute_rollback(target, plan, confirm="app")
        assert snapshot(pg, name) == before
    finally:
        drop_database(pg, name)


# --- a failing down migration changes nothing --------------------------------------------------


def test_failing_down_migration_changes_nothing(
    pg: LocalCluster, app_db: str, make_project, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    # The oldest of the three steps fails at its last statement: 0005 and 0004 and most of
    # 0003 have already run inside the transaction by then.
    down = folder / "0003_shift_status_no_show.down.sql"
    down.write_text(
        down.read_text() + '--> statement-breakpoint\nALTER TABLE "shifts" DROP COLUMN "nope";\n'
    )
    target = project_for(make_project, pg, app_db, folder).target("app")
    before = snapshot(pg, app_db)
    plan = plan_rollback(target, 3)
    with pytest.raises(RollbackFailedError) as caught:
        execute_rollback(target, plan, confirm="app")
    error = caught.value
    message = str(error)
    assert "down migration 0003_shift_status_no_show failed at statement 10 of 10" in message
    assert 'column "nope" of relation "shifts" does not exist' in message
    assert "The whole rollback was undone" in message
    assert error.failed_migration == "0003_shift_status_no_show"
    assert error.safety_backup is not None and str(error.safety_backup) in message
    assert load_artifact(error.safety_backup).meta.purpose == "pre-rollback"
    assert snapshot(pg, app_db) == before


# --- the example folder shipped for the docs and the demo --------------------------------------

EXAMPLE_HISTORY = Path(__file__).resolve().parents[2] / "examples" / "drizzle" / "migrations"


def test_example_history_rolls_back_step_by_step(pg: LocalCluster, make_project) -> None:
    dumps = history_dumps(pg, EXAMPLE_HISTORY)
    name = create_database(pg)
    try:
        migrate(pg, name, EXAMPLE_HISTORY)
        target = project_for(make_project, pg, name, EXAMPLE_HISTORY).target("app")
        for remaining in range(len(dumps) - 2, -1, -1):
            execute_rollback(target, plan_rollback(target, 1), confirm="app")
            assert schema_dump(pg, name) == dumps[remaining]
    finally:
        drop_database(pg, name)


# --- against drizzle-orm itself (needs node and `npm install drizzle-orm pg`) -------------------


def _drizzle_orm_dir() -> Path | None:
    if shutil.which("node") is None:
        return None
    for candidate in (os.environ.get("DRIZZLE_ORM_DIR"), str(EXAMPLE_HISTORY.parent)):
        if (
            candidate
            and (Path(candidate) / "node_modules" / "drizzle-orm" / "package.json").exists()
        ):
            return Path(candidate)
    return None


@pytest.mark.skipif(
    _drizzle_orm_dir() is None,
    reason="drizzle-orm not installed: set DRIZZLE_ORM_DIR to a folder where "
    "`npm install drizzle-orm pg` ran",
)
def test_rolls_back_a_database_migrated_by_drizzle_orm(
    pg: LocalCluster, history: list[str], make_project, tmp_path: Path
) -> None:
    modules = _drizzle_orm_dir()
    assert modules is not None
    (tmp_path / "node_modules").symlink_to(modules / "node_modules")
    script = tmp_path / "migrate.mjs"
    shutil.copy(EXAMPLE_HISTORY.parent / "migrate.mjs", script)

    def drizzle_migrate(dbname: str) -> None:
        subprocess.run(
            ["node", str(script), str(FIXTURE_HISTORY)],
            check=True,
            capture_output=True,
            env={**os.environ, "DATABASE_URL": pg.dsn(dbname)},
            timeout=120,
        )

    by_drizzle, by_us = create_database(pg), create_database(pg)
    try:
        drizzle_migrate(by_drizzle)
        migrate(pg, by_us)
        assert tracking_rows(pg, by_drizzle) == tracking_rows(pg, by_us)
        assert schema_dump(pg, by_drizzle) == schema_dump(pg, by_us) == history[HISTORY_LENGTH]
        target = project_for(make_project, pg, by_drizzle, FIXTURE_HISTORY).target("app")
        execute_rollback(target, plan_rollback(target, 3), confirm="app")
        assert schema_dump(pg, by_drizzle) == history[HISTORY_LENGTH - 3]
        drizzle_migrate(by_drizzle)  # drizzle sees the rolled-back migrations as pending again
        assert schema_dump(pg, by_drizzle) == history[HISTORY_LENGTH]
        assert [r[1:] for r in tracking_rows(pg, by_drizzle)] == [
            r[1:] for r in tracking_rows(pg, by_us)
        ]
    finally:
        drop_database(pg, by_drizzle)
        drop_database(pg, by_us)


def test_gives_up_on_locks_held_by_the_application_and_changes_nothing(
    pg: LocalCluster, app_db: str, make_project
) -> None:
    """A long application transaction on a table the down file alters: fail fast, undo all."""
    target = project_for(
        make_project, pg, app_db, FIXTURE_HISTORY, lock_timeout_seconds=0.5
    ).target("app")
    plan = plan_rollback(target, 2)
    with psycopg.connect(conninfo(pg, app_db)) as app:
        app.execute("SELECT count(*) FROM shift_swaps")  # holds ACCESS SHARE until rollback
        before = snapshot(pg, app_db)
        with pytest.raises(RollbackFailedError) as caught:
            execute_rollback(target, plan, confirm="app")
        app.rollback()
    message = str(caught.value)
    assert "down migration 0004_shift_swaps failed at statement 1 of 2" in message
    assert "lock timeout" in message
    assert snapshot(pg, app_db) == before


def test_refuses_a_database_drizzle_never_migrated(pg: LocalCluster, make_project) -> None:
    name = create_database(pg)
    try:
        target = project_for(make_project, pg, name, FIXTURE_HISTORY).target("app")
        with pytest.raises(
            RollbackRefusedError, match="drizzle.__drizzle_migrations does not exist"
        ):
            plan_rollback(target, 1)
    finally:
        drop_database(pg, name)


def test_files_without_breakpoints_run_as_one_multi_statement_chunk(
    pg: LocalCluster, make_project, tmp_path: Path
) -> None:
    """drizzle-kit with breakpoints: false writes files that drizzle sends as one query."""
    folder = tmp_path / "nobreaks"
    (folder / "meta").mkdir(parents=True)
    files = {
        "0000_rooms": (
            "CREATE TABLE rooms (id serial PRIMARY KEY, name text NOT NULL);\n"
            "INSERT INTO rooms (name) VALUES ('A 100%'), ('B');\n",
            "DROP TABLE rooms;\n",
        ),
        "0001_room_capacity": (
            "ALTER TABLE rooms ADD COLUMN capacity int NOT NULL DEFAULT 4;\n"
            "CREATE INDEX rooms_capacity_idx ON rooms (capacity);\n",
            "DROP INDEX rooms_capacity_idx;\nALTER TABLE rooms DROP COLUMN capacity;\n",
        ),
    }
    entries = []
    for idx, (tag, (up, down)) in enumerate(files.items()):
        (folder / f"{tag}.sql").write_text(up)
        (folder / f"{tag}.down.sql").write_text(down)
        entries.append(
            {
                "idx": idx,
                "version": "7",
                "when": 1700000000000 + idx,
                "tag": tag,
                "breakpoints": False,
            }
        )
    (folder / "meta" / "_journal.json").write_text(
        json.dumps({"version": "7", "dialect": "postgresql", "entries": entries})
    )
    name = create_database(pg)
    try:
        migrate(pg, name, folder, upto=1)
        one = schema_dump(pg, name)
        migrate(pg, name, folder)
        target = project_for(make_project, pg, name, folder).target("app")
        plan = plan_rollback(target, 1)
        assert plan.steps[0].statements == 1
        execute_rollback(target, plan, confirm="app")
        assert schema_dump(pg, name) == one
        assert query(pg, name, "SELECT name FROM rooms ORDER BY id") == [("A 100%",), ("B",)]
    finally:
        drop_database(pg, name)
