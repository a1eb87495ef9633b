"""The monitoring and follow-up sensors with 200 targets: every target gets its own correct
answer from the batched reads (one query for all targets, not one per target). Speed is
measured in benchmarks/bench_many_targets.py, not asserted here."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import yaml

from backup_pipelines.defs.monitoring.sensors import _new_check_results, evaluate_staleness
from backup_pipelines.defs.offsite.sensors import follow_up_requests
from backup_pipelines.engine.config import CONFIG_ENV_VAR, load_config
from backup_pipelines.lib.names import BACKUP_INVENTORY, LOGICAL_BACKUP, OFFSITE_COPY, target_key
from backup_pipelines.lib.project import project_config
from backup_pipelines.lib.status import collect_metrics
from backup_pipelines_tests.engine.storage_helpers import fake_backup

TARGETS = [f"db{i:03d}" for i in range(200)]
ON_DISK = set(TARGETS[:40])  # 2 backup files each; the first 20 of them three days old
OLD_ON_DISK = set(TARGETS[:20])
IN_DAGSTER = set(TARGETS[30:70])  # 2 materializations each, recorded now
FAILED_CHECK = set(TARGETS[60:70])  # their newest backup failed checksum_matches
WITH_OFFSITE = {t for i, t in enumerate(TARGETS) if i % 10 == 0}


@pytest.fixture(scope="module")
def many(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Built once for the module (the tests only read it, except for new backups of targets
    whose metrics they do not change)."""
    root = tmp_path_factory.mktemp("many")
    path = root / "backup_targets.yaml"
    targets = {
        name: {
            "dsn_env": "UNUSED_DSN",
            "max_age": "1d",
            **({"offsite": {"bucket": "many-bucket"}} if name in WITH_OFFSITE else {}),
        }
        for name in TARGETS
    }
    path.write_text(yaml.safe_dump({"backup_root": str(root / "backups"), "targets": targets}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFIG_ENV_VAR, str(path))
        patch.setenv("UNUSED_DSN", "postgresql://nobody@127.0.0.1:1/none")
        project_config.cache_clear()
        try:
            yield from _populated(load_config(path))
        finally:
            project_config.cache_clear()


def _populated(config):  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    for name in ON_DISK:
        age = timedelta(days=3) if name in OLD_ON_DISK else timedelta(hours=1)
        for extra in (1, 0):
            fake_backup(
                config.target(name).backup_dir,
                name,
                started_at=now - age - timedelta(hours=extra),
                target=name,
            )
    with dg.instance_for_test() as instance:
        for name in sorted(IN_DAGSTER):
            key = target_key(name, LOGICAL_BACKUP)
            for size in (100, 200 + TARGETS.index(name)):
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, metadata={"size_bytes": size})
                )
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name="checksum_matches",
                    passed=name not in FAILED_CHECK,
                    severity=dg.AssetCheckSeverity.ERROR,
                )
            )
        yield config, instance


def test_metrics_of_200_targets_each_come_from_their_own_records(many) -> None:  # type: ignore[no-untyped-def]
    config, instance = many
    metrics = {m.target: m for m in collect_metrics(instance, config)}
    assert set(metrics) == set(TARGETS)
    newest_on_disk = {
        name: max(a.meta.finished_at.timestamp() for a in _artifacts(config, name))
        for name in ON_DISK
    }
    for name in TARGETS:
        m = metrics[name]
        if name in IN_DAGSTER:
            assert m.backup_success is (name not in FAILED_CHECK), name
            assert m.backup_size_bytes == 200 + TARGETS.index(name)  # the newest one
            assert m.backup_last_success_timestamp is not None
            assert m.backup_last_success_timestamp >= newest_on_disk.get(name, 0)
        else:
            assert m.backup_success is None and m.backup_size_bytes is None, name
            assert (
                m.backup_last_success_timestamp == pytest.approx(newest_on_disk.get(name), abs=1e-3)
                if name in ON_DISK
                else m.backup_last_success_timestamp is None
            )
        assert m.restore_drill_success is None and m.offsite_copy_success is None


def _artifacts(config, name):  # type: ignore[no-untyped-def]
    from backup_pipelines.engine.artifacts import list_artifacts

    return list_artifacts(config.target(name).backup_dir)


def test_staleness_of_200_targets(many) -> None:  # type: ignore[no-untyped-def]
    config, instance = many
    now = datetime.now(UTC).timestamp()
    # Every target was first seen two days ago: those without any backup are stale too.
    cursor = json.dumps({name: {"first_seen": now - 2 * 86400} for name in TARGETS})
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    state, events = evaluate_staleness(context, config, now)
    stale = {name for name, entry in state.items() if "alerted" in entry}
    fresh = (ON_DISK - OLD_ON_DISK) | IN_DAGSTER
    assert stale == set(TARGETS) - fresh
    assert len(events) == len(stale)


def test_follow_ups_of_200_targets_once_per_backup(many) -> None:  # type: ignore[no-untyped-def]
    config, instance = many
    targets = list(config.targets)
    requests, cursor = follow_up_requests(instance, targets, None)
    by_target = {r.tags["backup_pipelines/target"]: r for r in requests}
    assert set(by_target) == IN_DAGSTER  # the newest backup of each, once
    for name, request in by_target.items():
        expected = [target_key(name, BACKUP_INVENTORY)]
        if name in WITH_OFFSITE:
            expected.insert(0, target_key(name, OFFSITE_COPY))
        assert request.asset_selection == expected
    assert follow_up_requests(instance, targets, cursor)[0] == []
    # A newer backup of three followed targets (with the same size: the metrics test, sharing
    # this instance, reads them too).
    again = sorted(IN_DAGSTER - FAILED_CHECK)[:3]
    for name in again:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=target_key(name, LOGICAL_BACKUP),
                metadata={"size_bytes": 200 + TARGETS.index(name)},
            )
        )
    requests, _ = follow_up_requests(instance, targets, cursor)
    assert sorted(r.tags["backup_pipelines/target"] for r in requests) == sorted(again)


def test_failed_checks_of_200_targets_are_found_in_one_pass(many) -> None:  # type: ignore[no-untyped-def]
    _, instance = many
    check_keys = [
        dg.AssetCheckKey(target_key(name, LOGICAL_BACKUP), check)
        for name in TARGETS
        for check in ("checksum_matches", "archive_readable")
    ]
    results, newest = _new_check_results(instance, check_keys, 0)
    failed = {e.asset_key.path[0] for _, e, _ in results if not e.passed}
    assert failed == FAILED_CHECK
    assert len(results) == len(IN_DAGSTER)
    assert _new_check_results(instance, check_keys, newest) == ([], newest)
