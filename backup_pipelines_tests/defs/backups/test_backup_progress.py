"""A Dagster backup run's logs carry the progress of the backup (through ``context.log``)."""

from __future__ import annotations

import dagster as dg

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines_tests.defs.backups.test_backup_assets import materialize_backup


def test_backup_run_logs_progress_lines(pg: LocalCluster, sample_db: str, make_project) -> None:
    make_project(
        {"production": {"dsn_env": "DATABASE_URL_PRODUCTION"}},
        env={"DATABASE_URL_PRODUCTION": pg.dsn(sample_db)},
    )
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        assert result.success
        messages = [
            record.user_message
            for record in instance.all_logs(result.run_id)
            if record.step_key and "logical_backup" in record.step_key
        ]
    progress = [m for m in messages if m.startswith("pg_dump progress: ")]
    assert progress, messages
    assert "done in" in progress[-1] and progress[-1].endswith("/s")
    assert all("\r" not in m for m in messages)
