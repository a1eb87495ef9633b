"""``<target>/backup_inventory`` through the real Dagster definitions: retention applied and shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines_tests.engine.storage_helpers import fake_backup

INVENTORY = dg.AssetKey(["production", "backup_inventory"])


@pytest.mark.slow
def test_inventory_applies_calendar_retention_and_lists_every_backup(
    make_project, monkeypatch
) -> None:
    monkeypatch.delenv("S3_BACKUP_BUCKET", raising=False)
    config = make_project(
        {
            "production": {
                "dsn_env": "DATABASE_URL_PRODUCTION",
                "retention": {"daily": 3, "weekly": 2, "monthly": 2},
            }
        },
        env={"DATABASE_URL_PRODUCTION": "postgresql://unused@127.0.0.1:1/x"},
    )
    folder = config.target("production").backup_dir
    now = datetime.now(UTC)
    nightly = [
        fake_backup(
            folder,
            "shop",
            started_at=(now - timedelta(days=d)).replace(hour=2),
            target="production",
        )
        for d in range(1, 80)
    ]
    safety = fake_backup(folder, "shop", started_at=now - timedelta(hours=1), purpose="pre-restore")
    (folder / "shop_crashed.sql.gz.partial").write_bytes(b"half")

    from backup_pipelines.definitions import defs

    definitions = defs()
    assert dg.AssetKey(["production", "offsite_copy"]) not in definitions.resolve_all_asset_keys()
    spec = next(s for s in definitions.resolve_all_asset_specs() if s.key == INVENTORY)
    assert dg.AssetKey(["production", "logical_backup"]) in {d.asset_key for d in spec.deps}

    job = definitions.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, asset_selection=[INVENTORY])
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    rows = {r.data["backup"]: r.data for r in metadata["backups"].value.records}
    assert set(rows) == {a.path.name for a in (*nightly, safety)}

    kept = {name for name, row in rows.items() if row["action"] == "kept"}
    remaining = {a.path.name for a in list_artifacts(folder)}
    assert remaining == kept
    assert metadata["pruned_count"].value == len(rows) - len(kept)
    assert set(metadata["pruned"].value) == set(rows) - kept
    assert rows[safety.path.name]["retention_class"] == "safety"
    assert rows[nightly[0].path.name]["action"] == "kept"
    # Yesterday's nightly represents its day (and, depending on the weekday, its week and month).
    assert "daily: newest of" in rows[nightly[0].path.name]["reason"]
    assert "monthly" in {row["retention_class"] for row in rows.values() if row["action"] == "kept"}
    assert {row["retention_class"] for row in rows.values() if row["action"] != "kept"} == {
        "pruned"
    }
    assert all(row["where"] == "local" for row in rows.values())
    # At most 3 daily + 2 weekly + 2 monthly representatives, plus the safety backup.
    assert len(kept) <= 3 + 2 + 2 + 1
    assert (folder / "shop_crashed.sql.gz.partial").exists()  # young leftover: left alone
    assert metadata["retention_held"].value is False


@pytest.mark.slow
def test_one_targets_failing_retention_does_not_stop_the_others(make_project, monkeypatch) -> None:
    """Every single-database target's inventory is one op: a run that takes several of them
    inventories each one, and a failure in one is reported by name after the others ran."""
    monkeypatch.delenv("S3_BACKUP_BUCKET", raising=False)
    names = ["alpha", "beta", "gamma"]
    config = make_project(
        {
            name: {
                "dsn_env": "DATABASE_URL_X",
                "retention": {"daily": 1, "weekly": 0, "monthly": 0},
            }
            for name in names
        },
        env={"DATABASE_URL_X": "postgresql://unused@127.0.0.1:1/x"},
    )
    now = datetime.now(UTC)
    for name in names:
        for days in (1, 2):
            fake_backup(
                config.target(name).backup_dir,
                name,
                started_at=now - timedelta(days=days),
                target=name,
            )

    from backup_pipelines.definitions import defs
    from backup_pipelines.defs.inventory import assets as inventory
    from backup_pipelines.engine.errors import BackupPipelinesError

    real_prune = inventory.prune_target

    def prune(target, **kwargs):
        if target.name == "beta":
            raise BackupPipelinesError("the backup folder is on fire")
        return real_prune(target, **kwargs)

    monkeypatch.setattr(inventory, "prune_target", prune)
    keys = [dg.AssetKey([name, "backup_inventory"]) for name in names]
    job = defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=keys, raise_on_error=False
        )
    assert not result.success
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialized == {keys[0], keys[2]}
    [failure] = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert "retention failed for 1 of 3 targets" in description
    assert "beta: the backup folder is on fire" in description
    for name in ("alpha", "gamma"):  # retention really ran there: daily 1 keeps one backup
        assert len(list_artifacts(config.target(name).backup_dir)) == 1
    assert len(list_artifacts(config.target("beta").backup_dir)) == 2
