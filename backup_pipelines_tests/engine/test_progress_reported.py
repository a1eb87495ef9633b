"""Long operations report through the one progress reporter: uploads part by part (S3 server
over HTTP), downloads, and pruning (backups deleted of the total)."""

from __future__ import annotations

import os
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup_pipelines.engine.offsite import offsite_storage, upload_backup
from backup_pipelines.engine.progress import ProgressReporter
from backup_pipelines.engine.restore.locate import latest_offsite_backup, local_copy
from backup_pipelines.engine.retention import prune_target
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.engine.storage_helpers import fake_backup

MiB = 1 << 20


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warning(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def target(make_project, aws_env: str):
    bucket = f"bp-progress-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=bucket)
    config = make_project(
        {
            "prod": {
                "dsn_env": "UNUSED_DSN",
                "offsite": {"bucket": bucket},
                "retention": {"daily": 1, "weekly": 0, "monthly": 0},
            }
        }
    )
    return config.target("prod")


def test_upload_and_download_report_every_part_and_a_summary(target, tmp_path: Path) -> None:
    artifact = fake_backup(target.backup_dir, "shop", payload=os.urandom(12 * MiB))
    size = artifact.meta.size_bytes
    storage = offsite_storage(target, min_part_size=5 * MiB)
    log = Lines()
    outcome = upload_backup(artifact, storage, log=log, progress=ProgressReporter(log, interval=0))
    assert outcome.put is not None and outcome.put.parts == 3
    upload = [line for line in log.lines if line.startswith(f"Upload of {outcome.url} progress:")]
    # One line per part S3 confirmed (interval 0), then the summary with the whole size.
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in upload[:3]] == ["42", "83", "100"]
    assert "done in" in upload[-1] and re.search(r"[\d.]+ (KiB|MiB)/s$", upload[-1])
    assert f"of {size / MiB:.1f} MiB (100%)" in upload[-1]

    remote = latest_offsite_backup(target)
    assert remote is not None
    with local_copy(remote, tmp_path, log=log, progress=ProgressReporter(log, interval=3600)):
        pass
    download = [line for line in log.lines if line.startswith("Download of s3://")]
    assert len(download) == 1  # nothing in between at a one-hour interval: the summary only
    assert "(100%), done in" in download[0]


def test_pruning_reports_backups_deleted_of_the_total(target) -> None:
    now = datetime.now(UTC)
    for days in range(4):
        fake_backup(target.backup_dir, "shop", started_at=now - timedelta(days=days))
    log = Lines()
    report = prune_target(target, log=log, progress=ProgressReporter(log, interval=0))
    assert len(report.pruned) == 3
    pruning = [line for line in log.lines if line.startswith("Pruning 'prod' progress:")]
    assert [line.split(": ", 1)[1].split(",")[0] for line in pruning] == [
        "1 of 3 backups (33%)",
        "2 of 3 backups (67%)",
        "3 of 3 backups (100%)",
        "3 of 3 backups (100%)",
    ]
    assert "done in" in pruning[-1]
    # Nothing left to prune: no progress at all.
    again = Lines()
    prune_target(target, log=again, progress=ProgressReporter(again, interval=0))
    assert not [line for line in again.lines if "progress" in line]
