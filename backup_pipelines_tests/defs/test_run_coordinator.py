"""Which target a run works on, as the run coordinator reads it when the run is submitted: from
the run config of the Launchpad jobs, from the selected assets, or from the whole job's assets.
(The queueing itself, with a real daemon: deploy/test_run_queue.py.)"""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.definitions import defs as load_defs
from backup_pipelines.lib.run_coordinator import config_targets, target_tags
from backup_pipelines.lib.tags import TAG_DB_HOST, TAG_TARGET


@pytest.fixture
def project(make_project, tmp_path: Path) -> dg.Definitions:  # type: ignore[no-untyped-def]
    make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "db_host": "pg-main",
                "pitr": {"archive_dir": str(tmp_path / "wal")},
            },
            "staging": {"dsn_env": "DB_STAGING"},
        },
        env={"DB_STAGING": "postgresql://u@db-staging.internal:6432/app"},
    )
    return load_defs()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _op_run(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    job: str,
    op: str,
    config: dict,
    tags: dict[str, str] | None = None,
) -> dg.DagsterRun:
    return instance.create_run_for_job(
        defs.resolve_job_def(job), run_config={"ops": {op: {"config": config}}}, tags=tags
    )


def _asset_run(
    instance: dg.DagsterInstance, defs: dg.Definitions, job: str, keys: list[str] | None = None
) -> dg.DagsterRun:
    job_def = defs.resolve_job_def(job)
    if keys is None:
        return instance.create_run_for_job(job_def)
    selection = {dg.AssetKey.from_user_string(key) for key in keys}
    return instance.create_run_for_job(
        job_def.get_subset(asset_selection=selection), asset_selection=selection
    )


def test_launchpad_jobs_get_the_target_of_their_run_config(
    project: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    restore = _op_run(
        instance,
        project,
        "restore_database",
        "restore_from_backup",
        {"target": "staging", "backup": "latest", "confirm": "staging"},
    )
    assert target_tags(instance, restore) == {
        TAG_TARGET: "staging",
        TAG_DB_HOST: "db-staging.internal:6432",
    }
    rollback = _op_run(
        instance,
        project,
        "rollback_migrations",
        "roll_back_migrations",
        {"target": "prod", "steps": 1},
    )
    assert target_tags(instance, rollback) == {TAG_TARGET: "prod", TAG_DB_HOST: "pg-main"}
    pitr = _op_run(
        instance,
        project,
        "pitr_restore",
        "restore_to_time",
        {"target": "prod", "to": "2026-11-24 15:30:00", "data_dir": "/srv/restored"},
    )
    assert target_tags(instance, pitr) == {TAG_TARGET: "prod", TAG_DB_HOST: "pg-main"}


def test_runs_of_assets_get_the_target_of_their_assets(
    project: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    one = _asset_run(instance, project, "logical_backups", ["staging/logical_backup"])
    assert target_tags(instance, one)[TAG_TARGET] == "staging"
    drill = _asset_run(
        instance, project, "restore_drills", ["prod/logical_backup", "prod/restore_drill"]
    )
    assert target_tags(instance, drill) == {TAG_TARGET: "prod", TAG_DB_HOST: "pg-main"}
    # Several targets in one run: no single value fits, the run is left as it is.
    both = _asset_run(instance, project, "logical_backups")
    assert target_tags(instance, both) == {}


def test_a_whole_job_of_one_target_is_tagged(make_project, instance: dg.DagsterInstance) -> None:  # type: ignore[no-untyped-def]
    make_project({"only": {"dsn_env": "DB_ONLY"}})
    run = _asset_run(instance, load_defs(), "logical_backups")
    assert run.asset_selection is None
    assert target_tags(instance, run) == {TAG_TARGET: "only", TAG_DB_HOST: "only"}


def test_tags_already_right_are_kept_and_a_wrong_target_is_corrected(
    project: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    config = {"target": "prod", "backup": "latest"}
    right = {TAG_TARGET: "prod", TAG_DB_HOST: "pg-main"}
    run = _op_run(instance, project, "restore_database", "restore_from_backup", config, right)
    assert target_tags(instance, run) == {}
    # The run config decides what the run touches, so it decides the limit it falls under.
    wrong = {TAG_TARGET: "staging"}
    run = _op_run(instance, project, "restore_database", "restore_from_backup", config, wrong)
    assert target_tags(instance, run) == {TAG_TARGET: "prod", TAG_DB_HOST: "pg-main"}


def test_without_the_targets_file_the_target_tag_is_still_set(
    project: dg.Definitions, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _op_run(
        instance,
        project,
        "restore_database",
        "restore_from_backup",
        {"target": "prod", "backup": "x"},
    )
    # A webserver that does not see the targets file still queues the run under its target.
    monkeypatch.setenv("BACKUP_PIPELINES_CONFIG", "/nonexistent/backup_targets.yaml")
    assert target_tags(instance, run) == {TAG_TARGET: "prod"}


def test_config_targets_reads_ops_inside_graphs_and_ignores_other_config() -> None:
    assert config_targets({}) == set()
    assert config_targets({"resources": {"x": {"config": {"target": "nope"}}}}) == set()
    nested = {"ops": {"graph": {"ops": {"inner": {"config": {"target": "prod"}}}}}}
    assert config_targets(nested) == {"prod"}
    assert config_targets({"ops": {"a": {"config": {"target": 3}}}}) == set()
