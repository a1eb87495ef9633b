"""Fault matrix: a wrong clock (faketime for the CLI, shifted backup times for Dagster).

A clock that jumps forward must not make retention delete the history; a clock that jumps back
(or a backup taken while the clock was fast) must not make a future-dated backup "the newest"
anywhere; both are refused by retention with a clear reason and raise an alert.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup_pipelines.defs.resources import BackupEngineResource
from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import BackupArtifact, list_artifacts, load_artifact
from backup_pipelines.engine.restore.locate import locate_backup
from backup_pipelines_tests.alert_receivers import webhook_receiver
from backup_pipelines_tests.engine.storage_helpers import fake_backup
from backup_pipelines_tests.fault_matrix.faketime import run_cli_at

NEGATIVE_AGE = re.compile(r"(?<![\w-])-\d+[mhd]")


def _nightly(folder: Path, days: int, newest: datetime) -> list[BackupArtifact]:
    """``days`` nightly backups (engine-written triples), the newest at ``newest``."""
    return [
        fake_backup(folder, "shop", started_at=newest - timedelta(days=d), target="prod")
        for d in range(days)
    ]


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.slow
def test_prune_refuses_when_the_clock_jumped_either_way_and_deletes_nothing(
    make_project, cli
) -> None:
    """The reported case: 61 nightly backups, retention 7/4/12, a clock 40 days ahead used to
    prune 58 of them (400 days ahead: all but one)."""
    config = make_project(
        {"prod": {"dsn_env": "UNUSED_DSN", "retention": {"daily": 7, "weekly": 4, "monthly": 12}}}
    )
    folder = config.target("prod").backup_dir
    made = _nightly(folder, 61, datetime.now(UTC) - timedelta(hours=1))
    before = _files(folder)
    assert len(before) == 61 * 3

    for offset, why in (
        ("+40 days", "jumped forward"),
        ("+400 days", "jumped forward"),
        ("-40 days", "dated in the future"),
        ("-2 hours", "dated in the future"),
    ):
        for dry_run in ((), ("--dry-run",)):
            result = run_cli_at(offset, "prune", "prod", *dry_run)
            assert result.returncode == 2, (offset, result.stdout, result.stderr)
            assert "retention refused, nothing was deleted" in result.stderr, result.stderr
            assert why in result.stderr
            assert "What to do: check this host's clock" in result.stderr
            assert "Traceback" not in result.stderr
            assert "pruned" not in result.stdout.replace("0 backup(s) pruned", "")
            assert _files(folder) == before, offset

    # With the right clock the same backups are pruned as the policy says.
    result = cli("prune", "prod")
    assert result.returncode == 0, result.stderr
    kept = {a.path.name for a in list_artifacts(folder)}
    assert {a.path.name for a in made[:7]} <= kept  # the last 7 days
    assert 7 < len(kept) <= 7 + 4 + 12

    # Dagster prunes right after each backup. After a +40 day clock step the new backup is
    # dated in the jumped time and "now" agrees with it: no refusal, and no history lost
    # beyond the one day and one week that move on, as on any other day.
    jumped = datetime.now(UTC) + timedelta(days=40)
    fake_backup(folder, "shop", started_at=jumped, target="prod")
    result = run_cli_at("+40 days", "prune", "prod")
    assert result.returncode == 0, result.stderr
    after = {a.path.name for a in list_artifacts(folder)}
    assert len(kept - after) <= 2, kept - after
    assert {a.path.name for a in made[:6]} <= after


def test_a_backup_taken_with_a_fast_clock_is_never_the_newest(
    pg: LocalCluster, sample_db: str, make_project, run_cli, tmp_path: Path
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "max_age": "2h"}},
        env={"DB_PROD": pg.dsn(sample_db)},
        metrics={"textfile": str(tmp_path / "metrics" / "bp.prom")},
    )
    target = config.target("prod")
    assert run_cli("backup", "prod").returncode == 0
    (good,) = list_artifacts(target.backup_dir)
    fast = run_cli_at("+30 days", "backup", "prod")  # a real backup while the clock is fast
    assert fast.returncode == 0, fast.stderr
    (ahead,) = [a for a in list_artifacts(target.backup_dir) if a.path != good.path]
    assert ahead.meta.started_at > datetime.now(UTC) + timedelta(days=29)

    listing = run_cli("list", "prod")
    assert listing.returncode == 0
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "future" in lines[ahead.path.name] and "in the future" in lines[ahead.path.name]
    assert "future" not in lines[good.path.name]
    assert not NEGATIVE_AGE.search(listing.stdout), listing.stdout

    fresh = run_cli("check-freshness", "prod")
    assert fresh.returncode == 1  # the future-dated backup is a problem to look at
    assert re.search(r"^prod: ok - newest backup is \d+m old$", fresh.stdout, re.M), fresh.stdout
    assert f"prod: WARNING - {ahead.path.name} is dated 29d23h in the future" in fresh.stdout
    assert not NEGATIVE_AGE.search(fresh.stdout)

    assert run_cli("metrics").returncode == 0
    text = (tmp_path / "metrics" / "bp.prom").read_text()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples["backup_pipelines_backup_last_success_timestamp_seconds"] == pytest.approx(
        good.meta.finished_at.timestamp()
    )

    assert locate_backup(config, target, "latest").path == good.path
    drill = run_cli("drill", "prod")
    assert drill.returncode == 0, drill.stderr
    assert good.path.name in drill.stdout and ahead.path.name not in drill.stdout

    from backup_pipelines.lib.status import newest_backup_timestamp

    with dg.instance_for_test() as instance:
        assert newest_backup_timestamp(instance, config, "prod") == pytest.approx(
            good.meta.finished_at.timestamp()
        )

    refused = run_cli("prune", "prod")
    assert refused.returncode == 2
    assert "dated in the future" in refused.stderr and ahead.path.name in refused.stderr
    assert load_artifact(ahead.path) and load_artifact(good.path)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["backup dated in the future", "clock ahead of the backups"])
def test_inventory_refuses_flags_the_check_and_alerts(make_project, fault: str) -> None:
    """In Dagster the refusal shows as the inventory's red ``clock_plausible`` check, and
    failed_check_alert_sensor sends the alert through the configured notifiers."""
    with webhook_receiver() as hooks:
        config = make_project(
            {
                "production": {
                    "dsn_env": "DATABASE_URL_PRODUCTION",
                    "retention": {"daily": 2, "weekly": 0, "monthly": 0},
                }
            },
            env={"DATABASE_URL_PRODUCTION": "postgresql://unused@127.0.0.1:1/x"},
            notifiers=[{"type": "webhook", "url": f"{hooks.url}/generic"}],
        )
        folder = config.target("production").backup_dir
        now = datetime.now(UTC)
        if fault == "backup dated in the future":
            made = _nightly(folder, 10, now - timedelta(hours=1))
            made.append(fake_backup(folder, "shop", started_at=now + timedelta(days=30)))
        else:  # the same as this host's clock running 40 days ahead of the backups
            made = _nightly(folder, 10, now - timedelta(days=40))
        before = _files(folder)

        from backup_pipelines.definitions import defs

        definitions = defs()
        key = dg.AssetKey(["production", "backup_inventory"])
        with dg.instance_for_test() as instance:
            sensor = definitions.resolve_sensor_def("failed_check_alert_sensor")

            def tick(cursor: str | None) -> dg.SensorResult:
                return sensor.evaluate_tick(
                    dg.build_sensor_context(
                        instance=instance,
                        cursor=cursor,
                        repository_def=definitions.get_repository_def(),
                        resources={"backup_engine": BackupEngineResource()},
                    )
                )

            start = tick(None)
            job = definitions.resolve_implicit_global_asset_job_def()
            result = job.execute_in_process(
                instance=instance, asset_selection=[key], raise_on_error=False
            )
            [evaluation] = result.get_asset_check_evaluations()
            assert evaluation.check_name == "clock_plausible"
            assert not evaluation.passed
            assert evaluation.severity == dg.AssetCheckSeverity.ERROR
            reason = evaluation.metadata["reason"].value
            assert reason.startswith("retention refused, nothing was deleted")
            [event] = result.get_asset_materialization_events()
            metadata = event.materialization.metadata
            assert metadata["retention_held"].value is True
            assert metadata["pruned_count"].value == 0
            assert _files(folder) == before
            tick(start.cursor)
        (alert,) = hooks.wait_for(1)
        body = alert["json"]
        assert body["title"] == "check clock_plausible failed on backup_inventory"
        assert body["target"] == "production"
        if fault == "backup dated in the future":
            assert "dated in the future" in body["reason"] and made[-1].path.name in body["reason"]
            rows = {r.data["backup"]: r.data for r in metadata["backups"].value.records}
            assert rows[made[-1].path.name]["retention_class"] == "future"
        else:
            assert "jumped forward or backups stopped" in body["reason"]


@pytest.mark.postgres
def test_base_backup_retention_refuses_a_jumped_clock_and_keeps_the_wal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Base backups and WAL follow the same rule: with a clock 40 days ahead (or behind) of the
    base backups nothing is pruned, WAL included; with the right clock retention runs."""
    from backup_pipelines.engine.backup.base import list_base_backups, run_base_backup
    from backup_pipelines.engine.pitr.retention import apply_pitr_retention
    from backup_pipelines.engine.wal import list_wal, wal_archive_for
    from backup_pipelines_tests.pitr_support import start_pitr_cluster

    setup = start_pitr_cluster(
        monkeypatch, target={"retention": {"daily": 1, "weekly": 0, "monthly": 0}}
    )
    try:
        target = setup.target
        for _ in range(2):
            run_base_backup(target).record_check("manifest", True, "checked in this test")
            setup.sql("SELECT txid_current()")
            setup.switch_and_wait()
        archive = wal_archive_for(target)
        wal_before = list_wal(archive)
        backups_before = [a.path for a, _ in list_base_backups(target)]
        assert len(backups_before) == 2
        now = datetime.now(UTC)
        for moment, why in (
            (now + timedelta(days=40), "jumped forward"),
            (now - timedelta(days=40), "dated in the future"),
        ):
            report = apply_pitr_retention(setup.config, target, now=moment)
            assert report.clock_problem is not None and why in report.clock_problem
            assert report.pruned == [] and report.wal_removed == []
            assert [a.path for a, _ in list_base_backups(target)] == backups_before
            assert list_wal(archive) == wal_before
        report = apply_pitr_retention(setup.config, target)
        assert report.clock_problem is None and len(report.pruned) == 1
    finally:
        setup.close()
