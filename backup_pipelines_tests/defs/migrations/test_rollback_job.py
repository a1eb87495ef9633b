"""The ``rollback_migrations`` job, launched through the real Dagster definitions."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.migration_support import (
    FIXTURE_HISTORY,
    HISTORY_LENGTH,
    app_project,
    copy_history,
    realistic_app_database,
    schema_dump,
    tracking_rows,
)

DSN_ENV = "BP_TEST_JOB_APP_DB"


def load_defs() -> dg.Definitions:
    from backup_pipelines.definitions import defs

    return defs()


@pytest.fixture
def app_db(pg: LocalCluster):
    with realistic_app_database(pg) as name:
        yield name


def configure(make_project, pg: LocalCluster, dbname: str, folder: Path = FIXTURE_HISTORY):
    return app_project(make_project, pg, dbname, DSN_ENV, folder).target("app")


def launch(**config: object) -> dg.ExecuteInProcessResult:
    job = load_defs().resolve_job_def("rollback_migrations")
    with dg.instance_for_test() as instance:
        return job.execute_in_process(
            run_config={"ops": {"roll_back_migrations": {"config": config}}},
            instance=instance,
            raise_on_error=False,
        )


def output_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dg.MetadataValue]:
    outputs = [e for e in result.all_node_events if e.is_successful_output]
    assert len(outputs) == 1
    return outputs[0].step_output_data.metadata


def failure_of(result: dg.ExecuteInProcessResult) -> tuple[str, dict[str, dg.MetadataValue]]:
    failures = [e for e in result.all_node_events if e.is_step_failure]
    assert len(failures) == 1
    error = failures[0].step_failure_data.user_failure_data
    return error.description or "", error.metadata


def state(pg: LocalCluster, dbname: str) -> tuple:
    return schema_dump(pg, dbname), tracking_rows(pg, dbname), fingerprint(pg, dbname)


def test_job_is_launchable_with_typed_config() -> None:
    job = load_defs().resolve_job_def("rollback_migrations")
    fields = job.run_config_schema.config_type.fields["ops"].config_type.fields
    config_fields = fields["roll_back_migrations"].config_type.fields["config"].config_type.fields
    assert {"target", "steps", "confirm", "dry_run"} <= set(config_fields)
    assert config_fields["target"].is_required and config_fields["steps"].is_required
    assert not config_fields["confirm"].is_required


def test_rollback_run_shows_before_and_after(pg: LocalCluster, app_db: str, make_project) -> None:
    configure(make_project, pg, app_db)
    result = launch(target="app", steps=2, confirm="app")
    assert result.success
    metadata = output_metadata(result)
    assert metadata["applied_before"].value == HISTORY_LENGTH
    assert metadata["last_before"].value == "0005_archive_cancelled_shifts"
    assert metadata["applied_after"].value == HISTORY_LENGTH - 2
    assert metadata["last_after"].value == "0003_shift_status_no_show"
    assert "0004_shift_swaps" in metadata["rolled_back"].value
    assert Path(metadata["safety_backup"].value).exists()
    history = {r.data["migration"]: r.data["state"] for r in metadata["history"].records}
    assert history["0005_archive_cancelled_shifts"] == "rolled back"
    assert history["0003_shift_status_no_show"] == "applied"
    assert len(tracking_rows(pg, app_db)) == HISTORY_LENGTH - 2
    assert DB_PASSWORD not in repr(result.all_events)


def test_dry_run_only_plans(pg: LocalCluster, app_db: str, make_project) -> None:
    configure(make_project, pg, app_db)
    before = state(pg, app_db)
    result = launch(target="app", steps=1, dry_run=True)
    assert result.success
    metadata = output_metadata(result)
    assert metadata["dry_run"].value is True
    assert "0005_archive_cancelled_shifts" in metadata["plan"].value
    assert state(pg, app_db) == before


def test_without_confirmation_the_run_fails_and_changes_nothing(
    pg: LocalCluster, app_db: str, make_project
) -> None:
    target = configure(make_project, pg, app_db)
    before = state(pg, app_db)
    result = launch(target="app", steps=1)
    assert not result.success
    description, _ = failure_of(result)
    assert "without confirmation; nothing was touched" in description
    assert "ops.roll_back_migrations.config.confirm" in description
    assert state(pg, app_db) == before
    assert not target.backup_dir.exists() or not any(target.backup_dir.glob("*.sql.gz"))


def test_failed_down_migration_reports_backup_and_migration(
    pg: LocalCluster, app_db: str, make_project, tmp_path: Path
) -> None:
    folder = copy_history(tmp_path / "drizzle")
    (folder / "0005_archive_cancelled_shifts.down.sql").write_text(
        'DROP TABLE "shifts_archive";--> statement-breakpoint\nSELECT 1 / 0;\n'
    )
    configure(make_project, pg, app_db, folder)
    before = state(pg, app_db)
    result = launch(target="app", steps=1, confirm="app")
    assert not result.success
    description, metadata = failure_of(result)
    assert "division by zero" in description
    assert metadata["failed_migration"].value == "0005_archive_cancelled_shifts"
    assert Path(metadata["safety_backup"].value).exists()
    assert state(pg, app_db) == before
    assert DB_PASSWORD not in repr(result.all_events)
