"""Point-in-time recovery commands: wal-push / wal-fetch (PostgreSQL calls these), wal-setup,
wal-status, base-backup, pitr-restore, pitr-drill.

``wal-push`` and ``wal-fetch`` run as the server's OS user from PostgreSQL's ``archive_command``
and ``restore_command``. Their exit status is part of the contract with PostgreSQL: they never
exit above 125 for an ordinary failure (that would restart the archiver or abort recovery), and
``wal-fetch`` exits 1 exactly when the file is not in the archive.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backup_pipelines.cli.output import add_progress_option, load_project, log, progress_for, say

EXIT_NOT_IN_ARCHIVE = 1
EXIT_REFUSED = 2


def cmd_wal_push(args: argparse.Namespace) -> int:
    # Everything is caught: any failure must reach PostgreSQL as status 1, never as a crash.
    try:
        from backup_pipelines.engine.wal import resolve_pitr_target, wal_archive_for, wal_push

        target = resolve_pitr_target(load_project(args.config), args.target)
        source = Path(args.path)
        outcome = wal_push(wal_archive_for(target), source, args.name)
        if outcome.stored:
            log.info(
                f"wal-push: archived {outcome.name} ({outcome.original_size} -> {outcome.size} "
                f"bytes) to {', '.join(outcome.stored)}"
            )
        if outcome.already_archived:
            log.info(
                f"wal-push: {outcome.name} was already archived with identical content in "
                f"{', '.join(outcome.already_archived)}"
            )
        return 0
    except BaseException as exc:  # noqa: BLE001 - the contract is "0 or 1", whatever happened
        log.error(f"wal-push FAILED for {getattr(args, 'path', '?')}: {_one_line(exc)}")
        return 1


def cmd_wal_fetch(args: argparse.Namespace) -> int:
    try:
        from backup_pipelines.engine.wal import (
            WalNotFoundError,
            resolve_pitr_target,
            wal_archive_for,
            wal_fetch,
        )

        target = resolve_pitr_target(load_project(args.config), args.target)
        try:
            outcome = wal_fetch(wal_archive_for(target), args.name, Path(args.path))
        except WalNotFoundError as exc:
            # Normal at the end of recovery: say it quietly.
            log.info(f"wal-fetch: {exc.message}")
            return EXIT_NOT_IN_ARCHIVE
        log.info(f"wal-fetch: restored {outcome.name} ({outcome.size} bytes) from {outcome.source}")
        return 0
    except BaseException as exc:  # noqa: BLE001 - never a status above 125
        log.error(f"wal-fetch REFUSED {getattr(args, 'name', '?')}: {_one_line(exc)}")
        return EXIT_REFUSED


def _one_line(exc: BaseException) -> str:
    """One line for PostgreSQL's server log: what is wrong, then what to do."""
    one_line = getattr(exc, "one_line", None)
    if callable(one_line):
        return str(one_line())
    return " ".join((str(exc) or type(exc).__name__).split())


def _owner(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def cmd_wal_setup(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.wal import (
        check_server_user_can_run,
        postgresql_conf_lines,
        resolve_pitr_target,
        setup_archive_dir,
    )

    config = load_project(args.config)
    target = resolve_pitr_target(config, args.target)
    settings = target.settings.pitr
    assert settings is not None
    # Before anything is created: PostgreSQL would only find out when archiving starts (126).
    checked = check_server_user_can_run(config, target, settings.server_os_user)
    if settings.archive_dir is not None:
        folder = setup_archive_dir(
            settings.archive_dir, settings.server_os_user, settings.archive_gid
        )
        info = folder.stat()
        shared = (
            f", readable by group {settings.archive_group}: add the monitoring user to it"
            if settings.archive_group
            else ""
        )
        say(
            f"WAL archive folder ready: {folder} (owner {_owner(info.st_uid)}, "
            f"mode {info.st_mode & 0o7777:04o}{shared})"
        )
    if settings.async_archive and settings.spool_dir is not None:
        spool = setup_archive_dir(
            settings.spool_dir, settings.server_os_user, what="async WAL spool (pitr.spool_dir)"
        )
        say(f"async archiving spool ready: {spool} (status files and prefetched segments)")
    if settings.archive_s3:
        say(
            f"WAL is also archived to {settings.archive_s3} (the server's OS user needs AWS credentials)"
        )
    say(f"Archive command checked as the server's OS user: {checked}")
    say("\nAdd to postgresql.conf (then restart PostgreSQL: archive_mode needs a restart):\n")
    for line in postgresql_conf_lines(config, target, args.archive_timeout):
        say(line)
    say(
        "\nThe server's OS user must be able to run that command and read "
        f"{config.source_path}. Check with: SELECT * FROM pg_stat_archiver;"
    )
    return 0


def cmd_wal_status(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.pitr.health import archive_health
    from backup_pipelines.engine.pitr.window import recovery_window
    from backup_pipelines.engine.wal import wal_archive_for

    config = load_project(args.config)
    target = config.target(args.target)
    archive = wal_archive_for(target)
    health = archive_health(target, archive=archive)
    window = recovery_window(target, archive)
    if args.json:
        say(
            json.dumps(
                {**health.as_dict(), "recoverable": window.describe(config.timezone)}, indent=2
            )
        )
    else:
        say(health.summary())
        say(f"  archive: {health.archive}")
        say(f"  recoverable range: {window.describe(config.timezone)}")
        if health.archiver:
            say(
                f"  pg_stat_archiver: last archived {health.archiver.get('last_archived_wal')}, "
                f"{health.archiver.get('failed_count')} failures, last failed "
                f"{health.archiver.get('last_failed_wal')}"
            )
        if health.server_error:
            say(f"  server: {health.server_error}")
    return 0 if health.healthy else 1


def cmd_base_backup(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.backup.base import run_base_backup
    from backup_pipelines.engine.backup.base_reader import verify_base_backup

    config = load_project(args.config)
    target = config.target(args.target)
    progress = progress_for(args)
    artifact = run_base_backup(target, log=log, purpose="manual", progress=progress)
    meta = artifact.meta
    say(f"base backup: {artifact.path}")
    say(
        f"  {meta.size_bytes} bytes, sha256 {meta.sha256}, WAL {getattr(meta, 'start_lsn', '?')}.."
        f"{getattr(meta, 'end_lsn', '?')} timeline {getattr(meta, 'timeline', '?')}, "
        f"first segment {getattr(meta, 'first_wal_segment', '?')}"
    )
    if args.skip_verify:
        return 0
    passed = True
    for outcome in verify_base_backup(artifact, target):
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
        artifact = artifact.record_check(outcome.name, outcome.passed, outcome.message)
        passed = passed and outcome.passed
    if not passed:
        say("base backup FAILED verification: do not rely on it (not copied offsite)")
        return 1
    if target.settings.offsite.is_enabled:
        from backup_pipelines.engine.offsite import base_backup_offsite_storage, upload_backup

        upload = upload_backup(
            artifact, base_backup_offsite_storage(target), log=log, progress=progress
        )
        say(f"  offsite: {upload.url}")
    return 0


def cmd_pitr_restore(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.pitr.recover import pitr_restore
    from backup_pipelines.engine.pitr.window import parse_target_time

    config = load_project(args.config)
    target = config.target(args.target)
    to = parse_target_time(args.to, config.timezone)
    result = pitr_restore(
        config,
        target,
        to,
        Path(args.data_dir),
        port=args.port,
        start=args.start,
        keep_archiving=args.keep_archiving,
        log=log,
        progress=progress_for(args),
    )
    say(result.summary())
    for warning in result.warnings:
        say(f"  warning: {warning}")
    if not args.start:
        say(
            f"  start it with: pg_ctl -D {result.data_dir} -l {result.log_path} start  "
            "(as the server's OS user); it replays WAL up to the target, then promotes"
        )
    if not args.keep_archiving:
        say(
            "  archive_mode is off in the restored cluster (so it cannot write a new timeline into "
            "the production archive); turn it on if this cluster becomes the new primary"
        )
    return 0


def cmd_pitr_drill(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.drills.pitr import pitr_drill

    config = load_project(args.config)
    result = pitr_drill(config, config.target(args.target), log=log, progress=progress_for(args))
    say(f"PITR drill {'PASSED' if result.passed else 'FAILED'}: {result.message}")
    if result.rto_seconds is not None:
        say(f"  RTO {result.rto_seconds:.1f}s, RPO {result.rpo_seconds}s")
    return 0 if result.passed else 1


def _spool_option(parser: argparse.ArgumentParser) -> None:
    # Answered by cli/wal_async.py before this parser runs; here only when it falls back to
    # the synchronous command (e.g. a direct fetch).
    parser.add_argument(
        "--spool-dir", help="async mode: the target's pitr.spool_dir (wal-setup adds it)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "wal-push", help="archive_command: archive one WAL file (wal-push --target NAME %%p)"
    )
    p.add_argument("path", help="%%p: the file's path (relative to the data directory)")
    p.add_argument("--target", help="target name (default: the only target with pitr:)")
    p.add_argument("--name", help="archive under this name (default: the file's own name)")
    _spool_option(p)
    p.set_defaults(func=cmd_wal_push)

    p = sub.add_parser(
        "wal-fetch", help="restore_command: fetch one archived WAL file (wal-fetch %%f %%p)"
    )
    p.add_argument("name", help="%%f: the file PostgreSQL asks for")
    p.add_argument("path", help="%%p: where to put it")
    p.add_argument("--target", help="target name (default: the only target with pitr:)")
    _spool_option(p)
    p.set_defaults(func=cmd_wal_fetch)

    p = sub.add_parser(
        "wal-setup", help="create the WAL archive folder and print the postgresql.conf lines"
    )
    p.add_argument("target", nargs="?")
    p.add_argument("--archive-timeout", type=int, default=60, help="seconds (bounds the RPO)")
    p.set_defaults(func=cmd_wal_setup)

    p = sub.add_parser("wal-status", help="WAL archive health: newest segment, lag, gaps, failures")
    p.add_argument("target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wal_status)

    p = sub.add_parser("base-backup", help="take a base backup (pg_basebackup) for PITR now")
    p.add_argument("target")
    p.add_argument("--skip-verify", action="store_true", help="skip the manifest verification")
    add_progress_option(p)
    p.set_defaults(func=cmd_base_backup)

    p = sub.add_parser(
        "pitr-restore", help="restore a target as it was at a moment into a NEW data directory"
    )
    p.add_argument("target")
    p.add_argument(
        "--to", required=True, help="'2026-11-24 15:30:00' (targets-file timezone) or ISO 8601"
    )
    p.add_argument(
        "--data-dir", required=True, help="new (or empty) folder for the restored cluster"
    )
    p.add_argument("--port", type=int, help="port of the restored server")
    p.add_argument("--start", action="store_true", help="start it and wait until it is promoted")
    p.add_argument(
        "--keep-archiving",
        action="store_true",
        help="leave archive_mode as in the backup (only for a restore that becomes the new primary)",
    )
    add_progress_option(p)
    p.set_defaults(func=cmd_pitr_restore)

    p = sub.add_parser(
        "pitr-drill", help="restore to a fresh point on a scratch port, check, clean up"
    )
    p.add_argument("target")
    add_progress_option(p)
    p.set_defaults(func=cmd_pitr_drill)
