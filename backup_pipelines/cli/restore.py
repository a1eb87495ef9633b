"""Commands for restores: restore (safe, in place), drill (restore test of the newest backup),
restore-cleanup (drop what killed restores left, and databases earlier restores replaced once
past their grace period)."""

from __future__ import annotations

import argparse

from backup_pipelines.cli.output import add_progress_option, load_project, log, progress_for, say


def cmd_restore(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.restore import restore_database

    config = load_project(args.config)
    report = restore_database(
        config,
        args.target,
        args.backup,
        confirm=args.confirm,
        log=log,
        allow_other_database=args.allow_other_database,
        progress=progress_for(args),
        database=args.database,
    )
    say(report.summary())
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.drills.logical import run_drill

    config = load_project(args.config)
    result = run_drill(
        config,
        args.target,
        log=log,
        backup=args.backup,
        progress=progress_for(args),
        database=args.database,
        fresh_server=args.fresh_server,
    )
    say(result.summary())
    if result.rto_seconds is not None:
        rto_target = config.target(args.target).settings.restore.rto_target_seconds
        verdict = "within" if result.rto_seconds <= rto_target else "OVER"
        say(f"  RTO {result.rto_seconds:.1f}s, {verdict} the target of {rto_target:g}s")
    return 0 if result.passed else 1


def cmd_restore_cleanup(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.restore.cleanup import restore_cleanup

    config = load_project(args.config)
    report = restore_cleanup(config.target(args.target), log=log)
    for name in report.interrupted.dropped:
        say(f"dropped {name} (left by an interrupted restore)")
    for name, reason in report.interrupted.left_alone.items():
        say(f"left alone {name}: {reason}")
    for folder in report.work_dirs_removed:
        say(f"removed {folder} (temporary files of an interrupted restore or drill)")
    for name in report.expired:
        say(f"dropped {name} (replaced by a restore, past its grace period)")
    for name, replaced_at in report.kept:
        say(f"kept {name} (replaced {replaced_at.isoformat()})")
    if report.grace_hours is None:
        say(
            "restore.drop_previous_after_hours is not set: replaced databases are kept until "
            "dropped by hand (DROP DATABASE name)"
        )
    if not (
        report.interrupted.dropped
        or report.interrupted.left_alone
        or report.expired
        or report.work_dirs_removed
    ):
        say("nothing to drop")
    return 0


DATABASE_HELP = (
    "the database of a server target (databases: all) to work on; required for such a target"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore",
        help="replace a target's database with a backup (verified, with a safety backup first)",
        description=(
            "Verify the backup, take a pre-restore safety backup, restore into a new database, "
            "check its row counts, then swap it in place of the live database (which is kept "
            "renamed). Any failure leaves the live database untouched."
        ),
    )
    p.add_argument(
        "backup", help="backup file under the backup root, an s3:// location, or 'latest'"
    )
    p.add_argument("target", help="the target whose database is replaced")
    p.add_argument("--database", help=DATABASE_HELP)
    p.add_argument(
        "--confirm",
        metavar="TARGET",
        help="the target's name, for scripts (at a terminal you are asked to type it)",
    )
    p.add_argument(
        "--allow-other-database",
        action="store_true",
        help="restore a backup taken of another target or database (e.g. production into staging)",
    )
    add_progress_option(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "drill",
        help="restore the newest backup into a scratch database and check it (never touches the target)",
    )
    p.add_argument("target")
    p.add_argument("--backup", help="drill this backup instead of the newest one")
    p.add_argument("--database", help=DATABASE_HELP)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fresh-server",
        dest="fresh_server",
        action="store_const",
        const=True,
        default=None,
        help="restore onto a throwaway cluster initialised for the drill (initdb of the "
        "backup's server version), roles from the backup's globals; fails when those "
        "binaries are missing (default: restore.drill.fresh_server, auto)",
    )
    mode.add_argument(
        "--same-server",
        dest="fresh_server",
        action="store_const",
        const=False,
        help="restore into a scratch database on the drill server (or the target's own)",
    )
    add_progress_option(p)
    p.set_defaults(func=cmd_drill)

    p = sub.add_parser(
        "restore-cleanup",
        help="drop the <db>_restoring_<time> databases of killed restores, and databases replaced "
        "by earlier restores once past restore.drop_previous_after_hours",
        description=(
            "Refuses while a restore of the target is running. Never touches the live database "
            "or a replaced database inside its grace period."
        ),
    )
    p.add_argument("target")
    p.set_defaults(func=cmd_restore_cleanup)
