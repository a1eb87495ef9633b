"""The integrity checks of every single-database target are one op: a run that checks several
targets gives each check its own verdict, and a check that breaks on one target does not
silence the others'."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from backup_pipelines_tests.engine.storage_helpers import fake_backup

NAMES = ["alpha", "beta", "gamma"]
CHECKS = ["checksum_matches", "archive_readable", "size_not_anomalous"]


def _keys(name: str) -> list[dg.AssetCheckKey]:
    return [dg.AssetCheckKey(dg.AssetKey([name, "logical_backup"]), c) for c in CHECKS]


@pytest.mark.slow
def test_each_target_gets_its_own_verdict(make_project, monkeypatch) -> None:
    monkeypatch.delenv("S3_BACKUP_BUCKET", raising=False)
    config = make_project(
        {name: {"dsn_env": "DATABASE_URL_X"} for name in NAMES},
        env={"DATABASE_URL_X": "postgresql://unused@127.0.0.1:1/x"},
    )
    from backup_pipelines.definitions import defs
    from backup_pipelines.defs.backups import checks

    now = datetime.now(UTC)
    artifacts = {}
    for name in NAMES:
        folder = config.target(name).backup_dir
        fake_backup(folder, name, started_at=now - timedelta(days=1), target=name)
        artifacts[name] = fake_backup(folder, name, started_at=now, target=name)
    # beta's newest backup is tampered with; gamma's readability check breaks outright.
    with artifacts["beta"].path.open("r+b") as handle:
        handle.write(b"tampered")
    real_readable = checks._FILE_CHECKS["archive_readable"]

    def readable(artifact):
        if artifact.meta.target == "gamma":
            raise RuntimeError("decoder exploded")
        return real_readable(artifact)

    monkeypatch.setitem(checks._FILE_CHECKS, "archive_readable", readable)

    definitions = defs()
    job = dg.define_asset_job(
        "check_all",
        selection=dg.AssetSelection.checks(*[k for name in NAMES for k in _keys(name)]),
    )
    merged = dg.Definitions.merge(definitions, dg.Definitions(jobs=[job]))
    with dg.instance_for_test() as instance:
        for name in NAMES:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=[name, "logical_backup"],
                    metadata={"path": dg.MetadataValue.path(str(artifacts[name].path))},
                )
            )
        result = merged.resolve_job_def("check_all").execute_in_process(
            instance=instance, raise_on_error=False
        )
    verdicts = {
        (e.asset_key.path[0], e.check_name): e for e in result.get_asset_check_evaluations()
    }
    assert set(verdicts) == {(name, check) for name in NAMES for check in CHECKS}
    passed = {key: e.passed for key, e in verdicts.items()}
    assert passed == {
        **{("alpha", c): True for c in CHECKS},
        ("beta", "checksum_matches"): False,
        ("beta", "archive_readable"): False,
        ("beta", "size_not_anomalous"): True,
        ("gamma", "checksum_matches"): True,
        ("gamma", "archive_readable"): False,
        ("gamma", "size_not_anomalous"): False,  # the break stops the rest of gamma's checks
    }
    broken = verdicts[("gamma", "archive_readable")].metadata["reason"].value
    assert "RuntimeError: decoder exploded" in str(broken)
    assert not result.success  # checksum_matches is blocking and ERROR: the run fails
    # The verdicts are recorded in each backup's .meta, as `backup-pipelines verify` does.
    from backup_pipelines.engine.artifacts import load_artifact

    recorded = load_artifact(artifacts["beta"].path).meta.verification
    assert recorded is not None and recorded["passed"] is False
