"""Commands for running without Dagster (cron) and for checking monitoring: cron-backup,
check-freshness, metrics, test-notifiers.

A crontab line that does what the guide's ``cron-backup.sh`` did (backup, verification, log file
rotated daily with 30 days kept, an email on failure, non-zero exit status on failure)::

    0 2 * * * backup-pipelines --config /etc/backup-pipelines/backup_targets.yaml \
        --log-file /var/log/backup-pipelines/cron.log cron-backup production
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backup_pipelines.cli.output import add_progress_option, load_project, log, say
from backup_pipelines.engine.clock import utc_now
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError

if TYPE_CHECKING:
    from backup_pipelines.engine.config import ProjectConfig


def _export_metrics(config: ProjectConfig) -> None:
    from backup_pipelines.engine.metrics import collect_from_disk, export

    if config.metrics.textfile or config.metrics.pushgateway_url:
        export(config.metrics, collect_from_disk(config), log=log)


def cmd_cron_backup(args: argparse.Namespace) -> int:
    from backup_pipelines.cli import backups
    from backup_pipelines.engine.notify import Alert, send_alert

    config = load_project(args.config)
    target = config.target(args.target)  # unknown target: a usage error, no alert
    backup_args = argparse.Namespace(
        config=args.config,
        target=args.target,
        database=None,  # a server target: every database, one failing never stops the others
        test=args.test,
        skip_verify=False,
        progress_interval=args.progress_interval,
    )
    started = time.monotonic()
    try:
        status = backups.cmd_backup(backup_args)
        reason = None if status == 0 else "the new backup failed verification: do not rely on it"
        if status and target.is_server:
            reason = "the backup of one or more databases failed (named in the log)"
    except BackupPipelinesError as exc:
        status, reason = exc.exit_code, exc.one_line()
    elapsed = time.monotonic() - started
    _export_metrics(config)
    if status == 0:
        log.info(f"cron-backup {args.target}: succeeded in {elapsed:.1f}s")
        return 0
    log.error(f"cron-backup {args.target}: FAILED after {elapsed:.1f}s: {reason}")
    send_alert(
        config,
        Alert(
            title="scheduled backup failed",
            message=f"backup-pipelines cron-backup {args.target} failed (exit status {status}).",
            target=args.target,
            what="logical_backup" + (" + restore test" if args.test else ""),
            reason=reason,
            details={"Log file": args.log_file} if args.log_file else {},
        ),
        log=log,
    )
    return status


def cmd_check_freshness(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.artifacts import list_artifacts
    from backup_pipelines.engine.databases import watched_targets
    from backup_pipelines.engine.listing import future_dated, future_note, human_age, newest_backup
    from backup_pipelines.engine.notify import Alert, send_alert

    config = load_project(args.config)
    names = args.targets or list(config.targets)
    now = utc_now()
    stale = []
    ahead = []
    for name in names:
        max_age = config.target(name).settings.max_age
        if max_age is None:
            say(f"{name}: not checked (max_age: off)")
            continue
        # A server target: each of its databases (one failing must not hide behind the others).
        for target in watched_targets(config.target(name)):
            shown = name if target.database is None else f"{name}/{target.database}"
            artifacts = list_artifacts(target.backup_dir)
            for artifact in future_dated(artifacts, now):
                note = f"{artifact.path.name} is {future_note(artifact, now)}"
                say(f"{shown}: WARNING - {note}")
                ahead.append((name, shown, note))
            newest = newest_backup(artifacts, now=now)
            if newest is None:
                say(f"{shown}: STALE - no backup at all (max_age {max_age})")
                stale.append((name, shown, "no backup at all"))
                continue
            finished = newest.meta.finished_at
            age = human_age(finished, now)
            if now - finished > max_age:
                say(f"{shown}: STALE - newest backup is {age} old (max_age {max_age})")
                stale.append((name, shown, f"newest backup finished {age} ago"))
            else:
                say(f"{shown}: ok - newest backup is {age} old")
    if args.notify:
        for name, shown, reason in stale:
            send_alert(
                config,
                Alert(
                    title="backup is stale",
                    message=f"{shown}: {reason}, more than its max_age of "
                    f"{config.targets[name].max_age}.",
                    target=name,
                    what="logical_backup",
                    reason=reason,
                    incident=f"stale:{shown}",
                ),
                log=log,
            )
        for name, shown, note in ahead:
            send_alert(
                config,
                Alert(
                    title="backup dated in the future",
                    message=f"{shown}: {note}. Check this host's clock (NTP); if it is right, "
                    "move that backup out of the backup folder.",
                    severity="warning",
                    target=name,
                    what="logical_backup",
                    reason=note,
                    incident=f"future:{shown}",
                ),
                log=log,
            )
    return 1 if stale or ahead else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.config import MetricsSettings
    from backup_pipelines.engine.metrics import collect_from_disk, export

    config = load_project(args.config)
    settings = config.metrics
    if args.textfile or args.pushgateway:
        settings = MetricsSettings(
            # A path on the command line is relative to where the command runs.
            textfile=Path(args.textfile).expanduser().resolve()
            if args.textfile
            else settings.textfile,
            pushgateway_url=args.pushgateway or settings.pushgateway_url,
            pushgateway_job=settings.pushgateway_job,
        )
    if not settings.textfile and not settings.pushgateway_url:
        raise ConfigError(
            "nowhere to export metrics",
            hint="pass --textfile PATH or --pushgateway URL, or set metrics.textfile / "
            "metrics.pushgateway_url in the targets file",
        )
    problems = export(settings, collect_from_disk(config), log=log)
    if problems:
        return 1
    where = " and ".join(str(x) for x in (settings.textfile, settings.pushgateway_url) if x)
    say(f"metrics for {len(config.targets)} targets exported to {where}")
    return 0


def cmd_test_notifiers(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.notify import Alert, send_alert

    config = load_project(args.config)
    if not config.notifiers:
        raise ConfigError(
            "no notifiers configured", hint="add a 'notifiers:' list to the targets file"
        )
    report = send_alert(
        config,
        Alert(
            title="test alert",
            message="A test from `backup-pipelines test-notifiers`: alerts reach you.",
            severity="info",
        ),
        log=log,
    )
    for name in report.delivered:
        say(f"{name}: delivered")
    for name, reason in report.failed.items():
        say(f"{name}: FAILED - {reason}")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cron-backup",
        help="for cron: back up and verify a target, export metrics, alert the notifiers on failure",
    )
    p.add_argument("target")
    p.add_argument("--test", action="store_true", help="also restore into a scratch database")
    add_progress_option(p)
    p.set_defaults(func=cmd_cron_backup)

    p = sub.add_parser(
        "check-freshness",
        help="exit 1 when a target's newest good backup is older than its max_age, or a "
        "backup is dated in the future (clock)",
    )
    p.add_argument("targets", nargs="*", help="default: every target")
    p.add_argument("--notify", action="store_true", help="send an alert for each stale target")
    p.set_defaults(func=cmd_check_freshness)

    p = sub.add_parser("metrics", help="export Prometheus metrics read from the backup files")
    p.add_argument("--textfile", help="node_exporter textfile to write (atomically)")
    p.add_argument("--pushgateway", help="Pushgateway URL, e.g. http://127.0.0.1:9091")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("test-notifiers", help="send a test alert through every notifier")
    p.set_defaults(func=cmd_test_notifiers)
