"""Metrics: the node_exporter textfile is complete and atomic; a real Pushgateway receives them."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import MetricsSettings
from backup_pipelines.engine.metrics import (
    TargetMetrics,
    collect_from_disk,
    export,
    render,
    write_textfile,
)

SAMPLE = [
    TargetMetrics(
        target="production",
        backup_success=True,
        backup_last_success_timestamp=1_700_000_000.5,
        backup_size_bytes=123456,
        backup_duration_seconds=12.25,
        restore_drill_success=False,
        restore_drill_duration_seconds=40.0,
        offsite_copy_success=True,
        offsite_copy_last_success_timestamp=1_700_000_100.0,
    ),
    TargetMetrics(target="staging", backup_success=False),
]


def samples(text: str) -> dict[tuple[str, str | None], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("target"))] = sample.value
    return found


def test_textfile_has_every_metric_and_leaves_unknowns_out(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "backup_pipelines.prom"
    write_textfile(path, SAMPLE, generated_at=1_700_000_200.0)
    values = samples(path.read_text())
    assert values[("backup_pipelines_backup_success", "production")] == 1
    assert values[("backup_pipelines_backup_success", "staging")] == 0
    assert (
        values[("backup_pipelines_backup_last_success_timestamp_seconds", "production")]
        == 1_700_000_000.5
    )
    assert values[("backup_pipelines_backup_size_bytes", "production")] == 123456
    assert values[("backup_pipelines_backup_duration_seconds", "production")] == 12.25
    assert values[("backup_pipelines_restore_drill_success", "production")] == 0
    assert values[("backup_pipelines_restore_drill_duration_seconds", "production")] == 40
    assert values[("backup_pipelines_offsite_copy_success", "production")] == 1
    assert values[("backup_pipelines_metrics_generated_timestamp_seconds", None)] == 1_700_000_200.0
    # Unknown is not "failed": staging has no drill or offsite metric at all.
    assert ("backup_pipelines_restore_drill_success", "staging") not in values
    assert ("backup_pipelines_backup_last_success_timestamp_seconds", "staging") not in values
    # Readable by node_exporter's user, no temp file left behind.
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["backup_pipelines.prom"]


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "backup_pipelines.prom"
    write_textfile(path, SAMPLE)
    before = path.stat().st_ino
    write_textfile(path, [TargetMetrics(target="production", backup_success=False)])
    # A new inode: readers holding the old file see it whole, new readers see the new one whole.
    assert path.stat().st_ino != before
    assert samples(path.read_text())[("backup_pipelines_backup_success", "production")] == 0
    # A write that cannot complete reports the problem and leaves no temp file behind.
    blocked = tmp_path / "blocked.prom"
    blocked.mkdir()
    problems = export(MetricsSettings(textfile=blocked), SAMPLE)
    assert problems and "cannot write metrics textfile" in problems[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup_pipelines.prom", "blocked.prom"]


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway is not installed: run scripts/bootstrap.sh")
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_push_to_a_real_pushgateway(pushgateway: str, tmp_path: Path) -> None:
    textfile = tmp_path / "m.prom"
    settings = MetricsSettings(
        textfile=textfile, pushgateway_url=pushgateway, pushgateway_job="backups"
    )
    assert export(settings, SAMPLE) == []
    scraped = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    values = {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.labels.get("job") == "backups":
                values[(sample.name, sample.labels.get("target"))] = sample.value
    assert values[("backup_pipelines_backup_success", "production")] == 1
    assert values[("backup_pipelines_backup_size_bytes", "production")] == 123456
    assert values[("backup_pipelines_backup_success", "staging")] == 0
    assert textfile.exists()


def test_unreachable_pushgateway_does_not_stop_the_textfile(tmp_path: Path) -> None:
    textfile = tmp_path / "m.prom"
    settings = MetricsSettings(textfile=textfile, pushgateway_url=f"http://127.0.0.1:{free_port()}")
    problems = export(settings, SAMPLE)
    assert len(problems) == 1 and "cannot push metrics" in problems[0]
    assert samples(textfile.read_text())[("backup_pipelines_backup_success", "production")] == 1


def test_collect_from_disk_reads_real_backups(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project(
        {"app": {"dsn_env": "DB_APP"}, "never": {"dsn_env": "DB_NEVER"}},
        env={"DB_APP": pg.dsn(sample_db)},
    )
    artifact = run_backup(config.target("app"))
    by_target = {m.target: m for m in collect_from_disk(config)}
    app = by_target["app"]
    assert app.backup_success is True
    assert app.backup_size_bytes == artifact.path.stat().st_size
    assert app.backup_last_success_timestamp == pytest.approx(artifact.meta.finished_at.timestamp())
    assert app.backup_duration_seconds == artifact.meta.duration_seconds
    assert by_target["never"] == TargetMetrics(target="never")
    # A backup whose verification failed is not "success", and not the newest good one.
    artifact.record_check("checksum_matches", False, "sha256 mismatch")
    app = {m.target: m for m in collect_from_disk(config)}["app"]
    assert app.backup_success is False
    assert app.backup_last_success_timestamp is None
    assert b"backup_pipelines_backup_success" in render(collect_from_disk(config))
