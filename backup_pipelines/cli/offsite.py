"""Commands for offsite copies and retention: prune, s3-lifecycle, offsite-sync."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from backup_pipelines.cli.output import add_progress_option, load_project, log, progress_for, say
from backup_pipelines.engine.errors import BackupPipelinesError, ConfigError, exit_code_for

if TYPE_CHECKING:
    from backup_pipelines.engine.config import ProjectConfig, Target


def each_database(args: argparse.Namespace, command: Callable[[Target], int]) -> int:
    """Run ``command`` on the target, or on each database of a server target with backups
    (dropped ones included: their retention still applies) or the one ``--database`` names.
    One database failing never stops the others; the status is the worst one."""
    from backup_pipelines.engine.databases import database_targets, databases_with_backups

    config = load_project(args.config)
    server = config.target(args.target)
    if not server.is_server or args.database is not None:
        return command(database_targets(server, args.database)[0])
    statuses = []
    for name in databases_with_backups(server):
        say(f"== database {name}")
        try:
            statuses.append(command(server.for_database(name)))
        except BackupPipelinesError as exc:
            log.error(exc.one_line())
            statuses.append(exit_code_for(exc))
    if not statuses:
        say(f"no backups for target '{server.name}' in {server.backup_dir}")
    return max(statuses, default=0)


def cmd_prune(args: argparse.Namespace) -> int:

    config = load_project(args.config)
    return each_database(args, lambda target: _prune(args, config, target))


def _prune(args: argparse.Namespace, config: ProjectConfig, target: Target) -> int:
    from backup_pipelines.engine.listing import human_size
    from backup_pipelines.engine.offsite import offsite_storage
    from backup_pipelines.engine.retention import RetentionRefusedError, prune_target

    storage = offsite_storage(target) if target.settings.offsite.is_enabled else None
    report = prune_target(
        target,
        timezone=config.timezone,
        storage=storage,
        dry_run=args.dry_run,
        log=log,
        progress=progress_for(args),
    )
    r = target.settings.retention
    say(
        f"retention for {target.label}: daily {r.daily}, weekly {r.weekly}, monthly {r.monthly} "
        f"({config.timezone}); local {target.backup_dir}"
        + (f", offsite {storage.url()}" if storage else ", no offsite copies configured")
    )
    if report.plan.held and report.plan.clock_problem is None:
        say(f"ON HOLD: {report.plan.hold_reason}")
    if not report.entries:
        say("no backups found")
    else:
        say(
            f"{'BACKUP':<48} {'TAKEN (UTC)':<20} {'WHERE':<9} {'SIZE':>10}  {'STATUS':<10} "
            f"{'CLASS':<15} ACTION"
        )
    for entry in report.entries:
        decision = entry.decision
        assert decision is not None
        if decision.keep:
            action = "keep"
        elif args.dry_run:
            action = "would prune"
        else:
            action = "pruned (" + "+".join(entry.deleted_from) + ")"
        say(
            f"{entry.name:<48} {entry.started_at.strftime('%Y-%m-%d %H:%M:%S'):<20} "
            f"{entry.locations:<9} {human_size(entry.size_bytes):>10}  {entry.status:<10} "
            f"{decision.retention_class:<15} {action}"
        )
    for item in report.unreadable:
        say(f"left alone (not trusted, never deleted): {item.path.name}: {item.reason}")
    verb = "would remove" if args.dry_run else "removed"
    for leftover in report.leftovers_removed:
        say(f"{verb} leftover {leftover}")
    say(
        f"{len(report.pruned)} backup(s) {'to prune' if args.dry_run else 'pruned'}, "
        f"{len(report.entries) - len(report.pruned)} kept"
    )
    for error in report.errors:
        log.error(error)
    if report.plan.clock_problem is not None:
        raise RetentionRefusedError(report.plan.clock_problem)
    return 1 if report.errors else 0


def cmd_s3_lifecycle(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.offsite import (
        apply_lifecycle,
        lifecycle_rules,
        lifecycle_warnings,
        offsite_storage,
    )

    config = load_project(args.config)
    target = config.target(args.target)
    rules = lifecycle_rules(target)
    for warning in lifecycle_warnings(target):
        log.warning(warning)
    if not args.apply:
        say(json.dumps({"Rules": rules}, indent=2))
        bucket = target.settings.offsite.resolved_bucket() or "BUCKET"
        say(
            f"# apply with: backup-pipelines s3-lifecycle {target.name} --apply "
            f"(keeps the bucket's other rules), or aws s3api put-bucket-lifecycle-configuration "
            f"--bucket {bucket} --lifecycle-configuration file://lifecycle.json"
        )
        return 0
    storage = offsite_storage(target)
    all_rules = apply_lifecycle(target, storage)
    say(json.dumps({"Rules": all_rules}, indent=2))
    say(
        f"lifecycle configuration of s3://{storage.bucket} updated: {len(rules)} rule(s) for "
        f"'{target.name}', {len(all_rules) - len(rules)} other rule(s) kept"
    )
    return 0


def cmd_offsite_sync(args: argparse.Namespace) -> int:
    return each_database(args, lambda target: _offsite_sync(args, target))


def _offsite_sync(args: argparse.Namespace, target: Target) -> int:
    from backup_pipelines.engine.listing import human_size
    from backup_pipelines.engine.offsite import offsite_storage, sync_offsite

    if not target.settings.offsite.is_enabled:
        raise ConfigError(
            f"offsite copies are not enabled for target '{target.name}'",
            hint="export S3_BACKUP_BUCKET or set offsite.bucket / offsite.enabled for the target",
        )
    storage = offsite_storage(target)
    report = sync_offsite(target, storage, log=log, progress=progress_for(args))
    for outcome in report.outcomes:
        state = "uploaded" if outcome.uploaded else "already there"
        say(f"{outcome.url}: {state} ({human_size(outcome.info.size)})")
    for name in report.skipped_failed:
        say(f"{name}: not uploaded (failed verification or damaged; see `backup-pipelines list`)")
    if report.error is not None:
        raise BackupPipelinesError(
            f"offsite copy stopped: {report.error.message}; local backups are kept, still to "
            f"upload: {', '.join(report.pending)}",
            hint=report.error.hint,
        )
    return 0


DATABASE_HELP = (
    "one database of a server target (databases: all); default: each database with backups"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="apply calendar retention (daily/weekly/monthly) to local backups and offsite copies",
    )
    p.add_argument("target")
    p.add_argument("--database", help=DATABASE_HELP)
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    add_progress_option(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "s3-lifecycle", help="print (or --apply) the S3 lifecycle rules for a target's copies"
    )
    p.add_argument("target")
    p.add_argument(
        "--apply", action="store_true", help="install the rules, keeping the bucket's other rules"
    )
    p.set_defaults(func=cmd_s3_lifecycle)

    p = sub.add_parser(
        "offsite-sync", help="upload every local backup of a target still missing in S3"
    )
    p.add_argument("target")
    p.add_argument("--database", help=DATABASE_HELP)
    add_progress_option(p)
    p.set_defaults(func=cmd_offsite_sync)
