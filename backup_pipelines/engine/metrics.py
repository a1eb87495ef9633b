"""Prometheus metrics per target: a node_exporter textfile (written atomically) and/or a Pushgateway.

Metric names (label ``target``; every one is a gauge):

=============================================================  ===================================
``backup_pipelines_backup_success``                             1 when the last backup attempt
                                                                succeeded (and passed its ERROR
                                                                checks), 0 when it failed
``backup_pipelines_backup_last_success_timestamp_seconds``     end of the newest good backup
``backup_pipelines_backup_size_bytes``                         size of the newest good backup
``backup_pipelines_backup_duration_seconds``                   how long it took
``backup_pipelines_restore_drill_success``                     last restore drill passed 1/0
``backup_pipelines_restore_drill_duration_seconds``            its time to restore (measured RTO)
``backup_pipelines_restore_drill_last_success_timestamp_seconds``
``backup_pipelines_offsite_copy_success``                      last offsite copy verified 1/0
``backup_pipelines_offsite_copy_last_success_timestamp_seconds``
``backup_pipelines_metrics_generated_timestamp_seconds``       when this file was written (no label)
=============================================================  ===================================

A server target (``databases: all``) has one series per metric, as fresh as its stalest
database. A metric is left out for a target when nothing is known yet (no drill ever ran, no
offsite copy configured), so alert rules never fire on "unknown".
``deploy/prometheus/alerts.yml`` holds the alert rules that use these names.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.clock import utc_now
from backup_pipelines.engine.config import TARGET_NAME_PATTERN, MetricsSettings, ProjectConfig
from backup_pipelines.engine.databases import watched_targets
from backup_pipelines.engine.fsutil import ensure_private_dir, fsync_dir
from backup_pipelines.engine.listing import newest_backup

PREFIX = "backup_pipelines"
TEXTFILE_MODE = 0o644  # node_exporter runs as another user; the file holds no secrets


@dataclass(frozen=True)
class TargetMetrics:
    """What is known about one target; ``None`` means unknown (the metric is left out)."""

    target: str
    backup_success: bool | None = None
    backup_last_success_timestamp: float | None = None
    backup_size_bytes: int | None = None
    backup_duration_seconds: float | None = None
    restore_drill_success: bool | None = None
    restore_drill_duration_seconds: float | None = None
    restore_drill_last_success_timestamp: float | None = None
    offsite_copy_success: bool | None = None
    offsite_copy_last_success_timestamp: float | None = None


# (field of TargetMetrics, metric name without prefix, help text)
_GAUGES: list[tuple[str, str, str]] = [
    ("backup_success", "backup_success", "Last backup attempt succeeded (1) or failed (0)"),
    (
        "backup_last_success_timestamp",
        "backup_last_success_timestamp_seconds",
        "Unix time when the newest successful backup finished",
    ),
    ("backup_size_bytes", "backup_size_bytes", "Size of the newest successful backup file"),
    (
        "backup_duration_seconds",
        "backup_duration_seconds",
        "Duration of the newest successful backup",
    ),
    (
        "restore_drill_success",
        "restore_drill_success",
        "Last restore drill passed (1) or failed (0)",
    ),
    (
        "restore_drill_duration_seconds",
        "restore_drill_duration_seconds",
        "Time to restore measured by the newest restore drill (RTO)",
    ),
    (
        "restore_drill_last_success_timestamp",
        "restore_drill_last_success_timestamp_seconds",
        "Unix time of the newest passing restore drill",
    ),
    (
        "offsite_copy_success",
        "offsite_copy_success",
        "Last offsite copy verified (1) or failed (0)",
    ),
    (
        "offsite_copy_last_success_timestamp",
        "offsite_copy_last_success_timestamp_seconds",
        "Unix time of the newest verified offsite copy",
    ),
]


def build_registry(
    metrics: Iterable[TargetMetrics], generated_at: float | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry()
    gauges = {
        field: Gauge(f"{PREFIX}_{name}", help_text, ["target"], registry=registry)
        for field, name, help_text in _GAUGES
    }
    for item in metrics:
        for field, gauge in gauges.items():
            value: Any = getattr(item, field)
            if value is None:
                continue
            gauge.labels(target=item.target).set(float(value))
    generated = Gauge(
        f"{PREFIX}_metrics_generated_timestamp_seconds",
        "Unix time when backup_pipelines last exported these metrics",
        registry=registry,
    )
    generated.set(generated_at if generated_at is not None else time.time())
    return registry


def render(metrics: Iterable[TargetMetrics], generated_at: float | None = None) -> bytes:
    """The Prometheus text exposition format."""
    return generate_latest(build_registry(metrics, generated_at))


def write_textfile(
    path: Path, metrics: Iterable[TargetMetrics], generated_at: float | None = None
) -> None:
    """Replace ``path`` atomically (temp file in the same folder, fsync, rename): node_exporter
    never reads a half-written file."""
    data = render(metrics, generated_at)
    path = Path(path)
    # node_exporter runs as another user: a folder made here must stay readable by it.
    ensure_private_dir(path.parent, what="metrics textfile folder", mode=0o755, warn_shared=False)
    # node_exporter's textfile collector only reads *.prom, so the temp name never gets scraped.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, TEXTFILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, TEXTFILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def push(
    gateway_url: str,
    metrics: Iterable[TargetMetrics],
    job: str = "backup_pipelines",
    timeout: float = 10,
    generated_at: float | None = None,
) -> None:
    """PUT the whole group to a Pushgateway (replaces what this job pushed before)."""
    push_to_gateway(
        gateway_url, job=job, registry=build_registry(metrics, generated_at), timeout=timeout
    )


def export(settings: MetricsSettings, metrics: list[TargetMetrics], log: Any = None) -> list[str]:
    """Write the textfile and push, as configured; returns the problems (each one also logged).

    A failing Pushgateway never prevents the textfile (and the other way round)."""
    problems: list[str] = []
    now = time.time()
    if settings.textfile:
        try:
            write_textfile(settings.textfile, metrics, now)
        except OSError as exc:
            problems.append(f"cannot write metrics textfile {settings.textfile}: {exc}")
    if settings.pushgateway_url:
        try:
            push(settings.pushgateway_url, metrics, settings.pushgateway_job, generated_at=now)
        except Exception as exc:  # URLError, HTTPError, timeouts
            problems.append(f"cannot push metrics to {settings.pushgateway_url}: {exc}")
    if log is not None:
        for problem in problems:
            log.error(problem)
    return problems


def collect_from_disk(config: ProjectConfig) -> list[TargetMetrics]:
    """Backup metrics read from the ``.meta`` files in ``backup_root`` (the CLI / cron view:
    no Dagster needed). Only what the files tell: drills and offsite copies are left out.

    A server target (``databases: all``) is reported as a whole, like the Dagster view: its
    last backup failed when any database's did, it is as fresh as its stalest database
    (unknown while one has no backup yet), and its size and duration are its databases'
    sums."""
    results = []
    now = utc_now()
    for target in config.all_targets():
        newest_of, best_of = [], []
        for watched in watched_targets(target):
            artifacts = list_artifacts(watched.backup_dir)
            newest_of.append(newest_backup(artifacts, now=now, usable_only=False))
            best_of.append(newest_backup(artifacts, now=now))
        attempted = [newest for newest in newest_of if newest is not None]
        good = [best for best in best_of if best is not None]
        complete = bool(good) and len(good) == len(best_of)
        results.append(
            TargetMetrics(
                target=target.name,
                backup_success=all(n.usable for n in attempted) if attempted else None,
                backup_last_success_timestamp=min(b.meta.finished_at.timestamp() for b in good)
                if complete
                else None,
                backup_size_bytes=sum(b.meta.size_bytes for b in good) if good else None,
                backup_duration_seconds=sum(b.meta.duration_seconds for b in good)
                if good
                else None,
            )
        )
    return results + invalid_target_metrics(config)


def invalid_target_metrics(config: ProjectConfig) -> list[TargetMetrics]:
    """Targets whose settings are invalid are not backed up: report them as failing (with their
    last backup on disk, if any) instead of dropping their series, which would quietly resolve
    the alerts on them."""
    results = []
    for name in config.broken_targets:
        newest = None
        if TARGET_NAME_PATTERN.match(name):
            good = [
                a
                for a in list_artifacts(config.resolved_backup_root / name)
                if a.status != "failed"
            ]
            newest = good[0] if good else None
        results.append(
            TargetMetrics(
                target=name,
                backup_success=False,
                backup_last_success_timestamp=newest.meta.finished_at.timestamp()
                if newest
                else None,
            )
        )
    return results
