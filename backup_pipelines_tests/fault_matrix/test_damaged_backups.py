"""Fault matrix: damaged backups and sidecars.

A truncated backup must stop being "verified" everywhere (list, retention, restore latest) as
soon as anything looks at it; verification results are recorded (atomically, with a clear
message when the disk is full); nothing with a missing or unreadable sidecar is hidden, trusted
or deleted by retention; and `list | head` never shows a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts, load_artifact
from backup_pipelines.engine.restore.locate import locate_backup
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.engine.storage_helpers import fake_backup
from backup_pipelines_tests.fault_matrix.faketime import run_cli_at


def _rows(stdout: str) -> dict[str, str]:
    """`backup-pipelines list` lines by backup name (header and footer left out)."""
    lines = stdout.splitlines()
    return {line.split()[0]: line for line in lines[1:] if line and not line.startswith("(")}


def test_truncated_backup_is_flagged_recorded_and_holds_retention(
    pg: LocalCluster, sample_db: str, make_project, cli
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "retention": {"daily": 1, "weekly": 0, "monthly": 0}}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    target = config.target("prod")
    for offset in ("-3 days", "-2 days"):
        assert run_cli_at(offset, "backup", "prod").returncode == 0
    assert cli("backup", "prod").returncode == 0
    newest, middle, oldest = list_artifacts(target.backup_dir)
    assert newest.status == "verified"
    files = {p.name for p in target.backup_dir.iterdir()}

    os.truncate(newest.path, newest.meta.size_bytes // 2)

    # `list` notices on its own (size against .meta), before anyone verifies.
    rows = _rows(cli("list", "prod").stdout)
    assert "damaged" in rows[newest.path.name] and "truncated" in rows[newest.path.name]
    assert "verified" in rows[middle.path.name]

    verify = cli("verify", str(newest.path))
    assert verify.returncode == 1
    assert "verification failed" in verify.stderr and "recorded in the .meta" in verify.stderr
    assert "Traceback" not in verify.stderr
    recorded = json.loads(newest.meta_path.read_text())["verification"]
    assert recorded["passed"] is False and recorded["checks"]["checksum"]["passed"] is False
    assert not list(target.backup_dir.glob("*.partial"))

    listing = cli("list", "prod", "--json")
    entry = next(e for e in json.loads(listing.stdout) if e["name"] == newest.path.name)
    assert entry["status"] == "failed" and "checksum" in entry["problem"]

    # The documented hold engages: the newest backup failed, nothing is deleted (daily: 1
    # would otherwise prune the oldest).
    prune = cli("prune", "prod")
    assert prune.returncode == 0, prune.stderr
    assert f"ON HOLD: the newest backup {newest.path.name} failed verification" in prune.stdout
    assert {p.name for p in target.backup_dir.iterdir()} == files
    # ... and "latest" is the newest good one.
    assert locate_backup(config, target, "latest").path == middle.path
    assert oldest.path.exists()


def test_dagster_checks_record_their_result_and_retention_holds(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "retention": {"daily": 1, "weekly": 0, "monthly": 0}}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    folder = config.target("prod").backup_dir
    old = [
        fake_backup(folder, "shop", started_at=datetime.now(UTC) - timedelta(days=d))
        for d in (3, 2)
    ]
    from backup_pipelines.definitions import defs

    definitions = defs()
    backup = dg.AssetKey(["prod", "logical_backup"])
    with dg.instance_for_test() as instance:
        result = definitions.resolve_job_def("logical_backups").execute_in_process(
            instance=instance, asset_selection=[backup]
        )
        assert result.success
        path = Path(
            instance.get_latest_materialization_event(backup)
            .asset_materialization.metadata["path"]
            .value
        )
        assert load_artifact(path).status == "verified"
        os.truncate(path, path.stat().st_size - 100)
        checks = dg.define_asset_job(
            "recheck",
            selection=dg.AssetSelection.checks(
                dg.AssetCheckKey(backup, "checksum_matches"),
                dg.AssetCheckKey(backup, "archive_readable"),
            ),
        )
        job = dg.Definitions.merge(definitions, dg.Definitions(jobs=[checks])).resolve_job_def(
            "recheck"
        )
        assert not job.execute_in_process(instance=instance, raise_on_error=False).success
        meta = load_artifact(path).meta
        assert meta.verification is not None and meta.verification["passed"] is False
        assert meta.verification["checks"]["checksum"]["passed"] is False

        inventory = definitions.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["prod", "backup_inventory"])]
        )
        metadata = inventory.get_asset_materialization_events()[0].materialization.metadata
        assert metadata["retention_held"].value is True
        assert metadata["pruned_count"].value == 0
        assert all(a.path.exists() for a in old)


def test_list_shows_every_damaged_backup_with_its_reason_and_prune_leaves_them(
    make_project, cli
) -> None:
    config = make_project(
        {"prod": {"dsn_env": "UNUSED", "retention": {"daily": 2, "weekly": 0, "monthly": 0}}}
    )
    folder = config.target("prod").backup_dir
    now = datetime.now(UTC)
    good = fake_backup(folder, "shop", started_at=now - timedelta(hours=1))
    safety = fake_backup(folder, "shop", started_at=now - timedelta(hours=2), purpose="pre-restore")
    no_sha = fake_backup(folder, "shop", started_at=now - timedelta(hours=3))
    no_sha.sha256_path.unlink()
    bad_sha = fake_backup(folder, "shop", started_at=now - timedelta(hours=4))
    bad_sha.sha256_path.write_text("0" * 64 + "  x\n")
    no_meta = fake_backup(folder, "shop", started_at=now - timedelta(days=30))
    no_meta.meta_path.unlink()
    garbled = fake_backup(folder, "shop", started_at=now - timedelta(days=31))
    garbled.meta_path.write_text('{"target": "prod", "size_')
    newer_tool = fake_backup(folder, "shop", started_at=now - timedelta(days=32))
    document = json.loads(newer_tool.meta_path.read_text())
    document["meta_version"] = 7
    newer_tool.meta_path.write_text(json.dumps(document))

    result = cli("list", "prod")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    rows = _rows(result.stdout)
    assert set(rows) == {
        a.path.name for a in (good, safety, no_sha, bad_sha, no_meta, garbled, newer_tool)
    }
    assert "verified" in rows[good.path.name] and "scheduled" in rows[good.path.name]
    assert "pre-restore" in rows[safety.path.name]
    assert "damaged" in rows[no_sha.path.name] and ".sha256 is missing" in rows[no_sha.path.name]
    assert "record different checksums" in rows[bad_sha.path.name]
    assert (
        "damaged" in rows[no_meta.path.name] and "metadata file missing" in rows[no_meta.path.name]
    )
    assert "not valid JSON" in rows[garbled.path.name]
    assert "meta_version 7" in rows[newer_tool.path.name]
    assert "newer version" in rows[newer_tool.path.name]
    as_json = {e["name"]: e for e in json.loads(cli("list", "prod", "--json").stdout)}
    assert as_json[newer_tool.path.name]["status"] == "damaged"
    assert "meta_version" in as_json[newer_tool.path.name]["problem"]

    # One line for the newer .meta, no traceback, exit 1; retention never deletes or trusts it.
    verify = cli("verify", str(newer_tool.path))
    assert verify.returncode == 1
    assert "Traceback" not in verify.stderr
    assert "written by a newer version" in verify.stderr and "upgrade" in verify.stderr
    prune = cli("prune", "prod")
    assert prune.returncode == 0, prune.stderr
    for unreadable in (no_meta, garbled, newer_tool):
        assert unreadable.path.exists()
        assert f"left alone (not trusted, never deleted): {unreadable.path.name}" in prune.stdout
    assert good.path.exists() and safety.path.exists()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_recording_the_verification_result(full_disk: Path, cli) -> None:
    backup = fake_backup(full_disk / "prod", "shop", verified=None)
    before = backup.meta_path.read_bytes()
    filler = full_disk / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)

    result = cli("verify", str(backup.path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "checksum: ok" in result.stdout  # the backup itself is fine ...
    assert "could not be recorded" in result.stderr and "the disk is full" in result.stderr
    assert "What to do: free space" in result.stderr
    assert backup.meta_path.read_bytes() == before  # ... and its .meta is as it was
    assert sorted(p.name for p in backup.path.parent.iterdir()) == sorted(
        [backup.path.name, *(p.name for p in backup.sidecars)]
    )

    filler.unlink()
    again = cli("verify", str(backup.path))
    assert again.returncode == 0, again.stderr
    assert load_artifact(backup.path).status == "verified"


@pytest.mark.slow
def test_list_into_a_closed_pipe_ends_quietly(make_project) -> None:
    config = make_project({"prod": {"dsn_env": "UNUSED"}})
    folder = config.target("prod").backup_dir
    now = datetime.now(UTC)
    for hour in range(1, 500):  # more output than a pipe buffers
        fake_backup(folder, "shop", started_at=now - timedelta(hours=hour))
    command = str(VENV_BIN / "backup-pipelines")
    for args in ("list prod", "list prod --json"):
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"{command} {args} | head -n 1"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == 1
    assert shutil.which("head")
