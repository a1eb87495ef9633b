"""The backup asset and its checks, materialized through the real Dagster definitions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines_tests.conftest import DB_PASSWORD, REPO_ROOT


def load_defs() -> dg.Definitions:
    from backup_pipelines.definitions import defs

    return defs()


def materialize_backup(
    instance: dg.DagsterInstance, target: str = "production"
) -> dg.ExecuteInProcessResult:
    job = load_defs().resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey([target, "logical_backup"])],
        raise_on_error=False,
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def run_checks(
    instance: dg.DagsterInstance, target: str, *names: str
) -> dict[str, dg.AssetCheckEvaluation]:
    """Run only the named checks, as "Execute checks" in the UI does (no new backup)."""
    key = dg.AssetKey([target, "logical_backup"])
    job = dg.define_asset_job(
        "checks_only",
        selection=dg.AssetSelection.checks(*[dg.AssetCheckKey(key, n) for n in names]),
    )
    defs = dg.Definitions.merge(load_defs(), dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def("checks_only").execute_in_process(
        instance=instance, raise_on_error=False
    )
    return check_results(result)


@pytest.fixture
def project(pg: LocalCluster, sample_db: str, make_project):
    return make_project(
        {"production": {"dsn_env": "DATABASE_URL_PRODUCTION"}},
        env={"DATABASE_URL_PRODUCTION": pg.dsn(sample_db)},
    )


def test_materialization_records_metadata_and_checks_pass(project) -> None:
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        assert result.success
        [event] = result.get_asset_materialization_events()
        metadata = event.materialization.metadata
        path = Path(metadata["path"].value)
        assert path.exists() and path.parent == project.target("production").backup_dir
        assert metadata["size_bytes"].value == path.stat().st_size
        assert len(metadata["sha256"].value) == 64
        assert metadata["dagster/row_count"].value == sum(
            r.data["rows"] for r in metadata["row_counts"].value.records
        )
        assert {r.data["table"] for r in metadata["row_counts"].value.records} >= {
            "hr.employee",
            "scheduling.shift",
        }
        for numeric in ("size_bytes", "duration_seconds", "compression_ratio"):
            assert isinstance(metadata[numeric], dg.IntMetadataValue | dg.FloatMetadataValue), (
                numeric
            )
        assert metadata["server_version"].value.startswith("15.")

        # The server's globals are part of the set; the superuser backup role read passwords.
        assert metadata["globals"].value.startswith(path.name + ".globals")
        assert metadata["globals_role_passwords"].value is True
        assert metadata["globals_roles"].value >= 4

        checks = check_results(result)
        assert set(checks) == {
            "checksum_matches",
            "archive_readable",
            "globals_readable",
            "size_not_anomalous",
        }
        assert all(c.passed for c in checks.values()), {n: c.metadata for n, c in checks.items()}
        assert "role passwords included" in checks["globals_readable"].metadata["result"].value

        # Secrets never reach the event log (metadata, logs, anything).
        records = instance.get_records_for_run(result.run_id).records
        assert records
        assert not [r for r in records if DB_PASSWORD in str(r.event_log_entry)]


def test_tampered_backup_fails_checksum_matches_with_error(project) -> None:
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        path = Path(
            result.get_asset_materialization_events()[0].materialization.metadata["path"].value
        )
        with path.open("r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00\x01\x02")
        checks = run_checks(instance, "production", "checksum_matches")
        evaluation = checks["checksum_matches"]
        assert not evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert "SHA-256 mismatch" in evaluation.metadata["result"].value


def test_missing_globals_file_fails_globals_readable(project) -> None:
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        metadata = result.get_asset_materialization_events()[0].materialization.metadata
        path = Path(metadata["path"].value)
        path.with_name(metadata["globals"].value).unlink()
        evaluation = run_checks(instance, "production", "globals_readable")["globals_readable"]
        assert not evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert "globals file missing" in evaluation.metadata["result"].value


def test_truncated_backup_fails_checks(project) -> None:
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        path = Path(
            result.get_asset_materialization_events()[0].materialization.metadata["path"].value
        )
        path.write_bytes(path.read_bytes()[:1000])
        checks = run_checks(instance, "production", "checksum_matches", "archive_readable")
        assert not checks["checksum_matches"].passed
        assert not checks["archive_readable"].passed
        assert "truncated" in checks["archive_readable"].metadata["result"].value


def test_shrunken_backup_warns(project, pg: LocalCluster, sample_db: str) -> None:
    with dg.instance_for_test() as instance:
        assert materialize_backup(instance).success
        pg.psql(
            "TRUNCATE scheduling.shift, payroll.payslip, payroll.audit_log, scheduling.clock_event",
            sample_db,
        )
        time.sleep(1.1)
        result = materialize_backup(instance)
        evaluation = check_results(result)["size_not_anomalous"]
        assert not evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.metadata["size_change_pct"].value < -50
        assert result.success  # a WARN does not fail the run


@pytest.mark.slow
def test_failed_backup_fails_the_run_with_an_actionable_message(make_project) -> None:
    make_project(
        {"production": {"dsn_env": "DATABASE_URL_PRODUCTION"}},
        env={"DATABASE_URL_PRODUCTION": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/app"},
    )
    with dg.instance_for_test() as instance:
        result = materialize_backup(instance)
        assert not result.success
        failure = [
            e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE
        ][0]
        text = str(failure.event_specific_data.error)
        assert "cannot connect to app@127.0.0.1:1/app" in text
        records = instance.get_records_for_run(result.run_id).records
        assert not [r for r in records if DB_PASSWORD in str(r.event_log_entry)]


def test_every_target_gets_an_asset_with_its_checks(make_project) -> None:
    make_project(
        {
            name: {"dsn_env": f"DB_{name.upper()}"}
            for name in ("development", "staging", "production")
        }
    )
    defs = load_defs()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    for name in ("development", "staging", "production"):
        key = dg.AssetKey([name, "logical_backup"])
        assert key in graph.get_all_asset_keys()
        node = graph.get(key)
        assert "postgres" in node.kinds
        assert "backup" in (node.description or "").lower()
        checks = {k.name for k in graph.asset_check_keys if k.asset_key == key}
        assert {
            "checksum_matches",
            "archive_readable",
            "globals_readable",
            "size_not_anomalous",
        } <= checks
    # A check pointing at a mistyped key would create a stub asset: every asset must be real.
    assert all(
        graph.get(k).is_materializable or graph.get(k).is_observable
        for k in graph.get_all_asset_keys()
    )


@pytest.mark.slow
def test_definitions_load_hundreds_of_targets_with_every_asset(tmp_path: Path) -> None:
    """Every one of 300 targets gets its assets in a fresh interpreter. (How fast that is, is
    measured by benchmarks/bench_many_targets.py, not asserted here.)"""
    config = tmp_path / "many.yaml"
    config.write_text(
        "backup_root: b\ntargets:\n"
        + "".join(f"  db_{i:03d}:\n    dsn_env: DATABASE_URL_{i:03d}\n" for i in range(300))
    )
    code = (
        "from backup_pipelines.definitions import defs; d=defs();"
        "keys=d.resolve_asset_graph().get_all_asset_keys();"
        "print(len({k.path[0] for k in keys if k.path[-1] == 'logical_backup'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"BACKUP_PIPELINES_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 300
