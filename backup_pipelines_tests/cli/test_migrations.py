"""``backup-pipelines rollback`` run as a user would, against a real PostgreSQL."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import load_artifact
from backup_pipelines_tests.conftest import DB_PASSWORD, VENV_BIN
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.migration_support import (
    FIXTURE_HISTORY,
    HISTORY_LENGTH,
    app_project,
    copy_history,
    history_dumps,
    realistic_app_database,
    schema_dump,
    tracking_rows,
)

DSN_ENV = "BP_TEST_CLI_APP_DB"


@pytest.fixture(scope="module")
def history(pg: LocalCluster) -> list[str]:
    return history_dumps(pg)


@pytest.fixture
def app_db(pg: LocalCluster):
    with realistic_app_database(pg) as name:
        yield name


def configure(make_project, pg: LocalCluster, dbname: str, folder: Path = FIXTURE_HISTORY):
    return app_project(make_project, pg, dbname, DSN_ENV, folder).target("app")


def state(pg: LocalCluster, dbname: str) -> tuple:
    return schema_dump(pg, dbname), tracking_rows(pg, dbname), fingerprint(pg, dbname)


def no_secrets(*outputs: str) -> None:
    for output in outputs:
        assert DB_PASSWORD not in output


def test_dry_run_prints_the_plan_and_changes_nothing(
    pg: LocalCluster, app_db: str, make_project, run_cli
) -> None:
    target = configure(make_project, pg, app_db)
    before = state(pg, app_db)
    result = run_cli("rollback", "3", "app", "--dry-run", input="")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "roll back 3 migration(s), newest first" in out
    assert out.index("0005_archive_cancelled_shifts") < out.index("0004_shift_swaps")
    assert "0003_shift_status_no_show.down.sql, 9 statement(s)" in out
    assert "afterwards the table ends at: 0002_employee_contact_and_rate" in out
    assert "dry run: nothing was changed" in out
    assert state(pg, app_db) == before
    assert not target.backup_dir.exists() or not any(target.backup_dir.glob("*.sql.gz"))
    no_secrets(result.stdout, result.stderr)


def test_rollback_with_confirmation(
    pg: LocalCluster, app_db: str, history: list[str], make_project, cli
) -> None:
    configure(make_project, pg, app_db)
    result = cli("rollback", "3", "app", "--confirm", "app", input="")
    assert result.returncode == 0, result.stderr
    assert "Rolled back 3 migration(s) of 'app'" in result.stdout
    for tag in ("0005_archive_cancelled_shifts", "0004_shift_swaps", "0003_shift_status_no_show"):
        assert f"  - {tag}" in result.stdout
    assert "after:  3 applied, last 0002_employee_contact_and_rate (verified)" in result.stdout
    backup_line = next(
        line for line in result.stdout.splitlines() if line.strip().startswith("safety backup:")
    )
    backup = Path(backup_line.split("safety backup:", 1)[1].strip())
    assert load_artifact(backup).meta.purpose == "pre-rollback"
    assert schema_dump(pg, app_db) == history[HISTORY_LENGTH - 3]
    no_secrets(result.stdout, result.stderr)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["rollback", "7", "app"], "cannot roll back 7 migration(s): 6 are applied"),
        (["rollback", "0", "app", "--dry-run"], "give a number of steps between 1 and 6"),
        (["rollback", "1", "app"], "refusing to roll back 1 migration(s)"),
        (["rollback", "1", "app", "--confirm", "prod"], "does not match the target 'app'"),
        (["rollback", "1", "nope"], "unknown target 'nope'"),
    ],
)
def test_refusals_exit_2_and_change_nothing(
    pg: LocalCluster, app_db: str, make_project, cli, args: list[str], expected: str
) -> None:
    target = configure(make_project, pg, app_db)
    before = state(pg, app_db)
    result = cli(*args, input="")  # stdin is not a terminal: no prompt
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert state(pg, app_db) == before
    assert not target.backup_dir.exists() or not any(target.backup_dir.glob("*.sql.gz"))


def test_steps_must_be_a_number(make_project, cli) -> None:
    result = cli("rollback", "three", "app")
    assert result.returncode == 2
    assert "steps must be a whole number" in result.stderr


def test_failed_down_migration_names_it_and_changes_nothing(
    pg: LocalCluster, app_db: str, make_project, cli, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    down = folder / "0004_shift_swaps.down.sql"
    # First statement succeeds, the second fails: the half-done step must not survive.
    down.write_text(down.read_text().replace('"swap_state"', '"swap_state_typo"'))
    configure(make_project, pg, app_db, folder)
    before = state(pg, app_db)
    result = cli("rollback", "2", "app", "--confirm", "app", input="")
    assert result.returncode == 1
    assert "down migration 0004_shift_swaps failed at statement 2 of 2" in result.stderr
    assert 'type "public.swap_state_typo" does not exist' in result.stderr
    assert "safety backup:" in result.stderr
    assert state(pg, app_db) == before
    no_secrets(result.stdout, result.stderr)


def _run_on_terminal(args: list[str], typed: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin, as an operator at a shell would."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(VENV_BIN / "backup-pipelines"), *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        os.close(terminal)
        terminal = -1
        os.write(controller, typed.encode() + b"\n")
        output, _ = proc.communicate(timeout=120)
        return proc.returncode, output
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)


@pytest.mark.parametrize(("typed", "exit_code"), [("app", 0), ("staging", 2)])
def test_operator_at_a_terminal_is_asked_to_type_the_target(
    pg: LocalCluster, app_db: str, make_project, typed: str, exit_code: int
) -> None:
    configure(make_project, pg, app_db)
    code, output = _run_on_terminal(["rollback", "1", "app"], typed, {})
    assert code == exit_code, output
    assert "Type the target name (app) to continue:" in output
    expected_rows = HISTORY_LENGTH - 1 if exit_code == 0 else HISTORY_LENGTH
    assert len(tracking_rows(pg, app_db)) == expected_rows
