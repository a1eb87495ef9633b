"""Commands for logical backups: backup, verify, list, check-config."""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from backup_pipelines.cli.output import add_progress_option, load_project, log, progress_for, say
from backup_pipelines.engine.clock import is_future
from backup_pipelines.engine.errors import (
    EXIT_REFUSED,
    BackupPipelinesError,
    ConfigError,
    IntegrityError,
    exit_code_for,
)

if TYPE_CHECKING:
    from backup_pipelines.engine.artifacts import BackupArtifact
    from backup_pipelines.engine.config import Target
    from backup_pipelines.engine.listing import BackupListing


def cmd_backup(args: argparse.Namespace) -> int:
    # Only what the dump needs is imported before pg_dump starts; verification comes after.
    from backup_pipelines.engine.databases import database_targets

    config = load_project(args.config)
    server = config.target(args.target)
    targets = database_targets(server, args.database)
    if not server.is_server or args.database is not None:
        # One database (a single-database target, or the one --database names): its own
        # errors and exit status, as before.
        return _backup_one(args, targets[0])
    # Every database of a server target: one failing database never stops the others.
    say(f"target '{server.name}': {len(targets)} database(s) to back up")
    failed: list[str] = []
    for target in targets:
        try:
            status = _backup_one(args, target)
        except BackupPipelinesError as exc:
            log.error(exc.one_line())
            status = 1
        if status:
            failed.append(target.database or target.name)
    if failed:
        say(f"{len(failed)} of {len(targets)} database(s) FAILED: {', '.join(failed)}")
        return 1
    say(f"all {len(targets)} database(s) backed up")
    return 0


def _backup_one(args: argparse.Namespace, target: Target) -> int:
    from backup_pipelines.engine.backup.logical import run_backup
    from backup_pipelines.engine.listing import human_size

    progress = progress_for(args)
    artifact = run_backup(target, log=log, purpose="manual", progress=progress)
    say(f"backup: {artifact.path}")
    say(
        f"  size {human_size(artifact.meta.size_bytes)} (dump {human_size(artifact.meta.dump_bytes)}), "
        f"sha256 {artifact.meta.sha256}"
    )
    say(
        f"  {len(artifact.meta.row_counts)} tables, {artifact.meta.total_rows} rows, "
        f"{artifact.meta.duration_seconds:.1f}s"
    )
    if args.skip_verify:
        return 0
    from backup_pipelines.engine.drills.logical import restore_test
    from backup_pipelines.engine.verify import verify_artifact

    passed = True
    for outcome in verify_artifact(artifact):
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
        artifact.record_check(outcome.name, outcome.passed, outcome.message)
        passed = passed and outcome.passed
    if passed and args.test:
        result = restore_test(target, artifact, log=log, progress=progress)
        say(f"  {result.summary()}")
        artifact.record_check("restore_test", result.passed, result.summary())
        passed = result.passed
    if not passed:
        say("backup FAILED verification: do not rely on it")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    locations = _verify_locations(args)
    failures: list[BackupPipelinesError] = []
    for location in locations:
        try:
            _verify_one(location)
        except BackupPipelinesError as exc:
            if len(locations) == 1:
                raise
            log.error(exc.one_line())
            failures.append(exc)
    if failures:
        say(f"{len(failures)} of {len(locations)} backup(s) FAILED verification")
        return exit_code_for(failures[0])
    return 0


def _verify_locations(args: argparse.Namespace) -> list[str]:
    """The backup file named, or the newest backup of a target (each database of a server)."""
    from backup_pipelines.engine.databases import database_targets, databases_with_backups
    from backup_pipelines.engine.listing import list_backups

    given = args.backup
    is_file = given.startswith("s3://") or Path(given).exists()
    if is_file:
        if args.database is not None:
            raise ConfigError(
                "--database goes with a target name, not with a backup file",
                hint="run `backup-pipelines verify TARGET --database NAME`, or leave out --database",
            )
        return [given]
    config = load_project(args.config)
    if given not in config.targets and given not in config.broken_targets:
        raise ConfigError(
            f"{given}: no such backup file, and no target of that name",
            hint="name a backup file, an s3:// location, or a target (its newest backup)",
        )
    server = config.target(given, None)
    if server.is_server and args.database is None:
        targets = [server.for_database(name) for name in databases_with_backups(server)]
    else:
        targets = database_targets(server, args.database)
    locations = []
    for target in targets:
        newest = list_backups(target).newest
        if newest is None:
            raise IntegrityError(
                f"{target.label} has no backup in {target.backup_dir}",
                hint=f"take one: `backup-pipelines backup {target.name}"
                + (f" --database {target.database}`" if target.database else "`"),
            )
        locations.append(str(newest.path))
    if not locations:
        raise IntegrityError(
            f"{server.label} has no backups in {server.backup_dir}",
            hint=f"take them: `backup-pipelines backup {server.name}`",
        )
    return locations


def _verify_one(location: str) -> None:
    from backup_pipelines.engine.storage import open_backup
    from backup_pipelines.engine.verify import verify_artifact

    artifact = open_backup(location)
    meta = artifact.meta
    say(f"{artifact.location}")
    say(
        f"  target {meta.target}, database {meta.database}, {meta.format}/{meta.compression}, "
        f"encryption {describe_encryption(meta.encryption)}, taken {meta.started_at.isoformat()}"
    )
    outcomes = verify_artifact(artifact)
    for outcome in outcomes:
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
    # The result goes into .meta, so `list`, retention and `restore latest` know it too.
    not_recorded: BackupPipelinesError | None = None
    try:
        for outcome in outcomes:
            artifact = artifact.record_check(outcome.name, outcome.passed, outcome.message)
    except BackupPipelinesError as exc:
        not_recorded = exc
    failed = next((o for o in outcomes if not o.passed), None)
    if failed is not None:
        raise IntegrityError(
            f"verification failed: {failed.message}"
            + (
                f"; the result could not be recorded either: {not_recorded.message}"
                if not_recorded
                else " (recorded in the .meta)"
            ),
            hint=failed.hint
            or "do not restore from this file; use an older backup or the offsite copy",
        )
    if not_recorded is not None:
        raise not_recorded
    say("  result recorded in the .meta")
    say("OK")


def describe_encryption(encryption: dict) -> str:
    mode = encryption.get("mode", "none")
    key = encryption.get("key_id") or encryption.get("fingerprint")
    return f"{mode} (key {key})" if key else mode


@dataclass(frozen=True)
class ListRow:
    """One line of `list`: a complete backup, or a data file whose .meta cannot be read."""

    name: str
    path: Path
    started_at: datetime | None
    size_bytes: int | None
    purpose: str
    status: str
    key: str
    note: str
    sha256: str | None = None
    encryption: dict | None = None
    dated_in_future: bool = False
    globals: dict | None = None


def _globals_note(artifact: BackupArtifact) -> str:
    """What a restore onto a new server would lack: the roles' passwords, or every role."""
    entry = artifact.meta.globals
    if entry is None:
        return "no globals (taken before they were captured): roles not included"
    return "" if entry.role_passwords else "globals without role passwords (no role passwords)"


def _globals_json(artifact: BackupArtifact) -> dict | None:
    entry = artifact.meta.globals
    if entry is None:
        return None
    return {
        "file_name": entry.file_name,
        "roles": entry.roles,
        "role_passwords": entry.role_passwords,
        "role_passwords_reason": entry.role_passwords_reason,
    }


def _list_rows(listing: BackupListing) -> list[ListRow]:
    from backup_pipelines.engine.listing import future_note, problem_of

    rows = []
    for a in listing.artifacts:
        future = is_future(a.meta.started_at, listing.now)
        rows.append(
            ListRow(
                name=a.path.name,
                path=a.path,
                started_at=a.meta.started_at,
                size_bytes=a.meta.size_bytes,
                purpose=a.meta.purpose,
                status=a.status,
                key=describe_encryption(a.meta.encryption),
                note=problem_of(a)
                or (future_note(a, listing.now) if future else "")
                or _globals_note(a),
                sha256=a.meta.sha256,
                encryption=a.meta.encryption,
                dated_in_future=future,
                globals=_globals_json(a),
            )
        )
    for u in listing.unreadable:
        size: int | None = None
        with contextlib.suppress(OSError):
            size = u.path.stat().st_size
        rows.append(
            ListRow(
                u.path.name, u.path, None, size, "?", "damaged", "?", u.reason + UNREADABLE_NOTE
            )
        )
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r.started_at or epoch, r.name), reverse=True)


UNREADABLE_NOTE = " (not trusted, never deleted by retention)"


def cmd_list(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.databases import (
        database_targets,
        databases_with_backups,
        server_databases,
    )
    from backup_pipelines.engine.listing import list_backups

    config = load_project(args.config)
    server = config.target(args.target)
    if not server.is_server or args.database is not None:
        return _list_one(args, database_targets(server, args.database)[0], with_database=False)
    # A server target: every database with backups, then those on the server without any.
    names = databases_with_backups(server)
    try:
        names += [n for n in server_databases(server) if n not in names]
    except BackupPipelinesError as exc:
        log.warning(f"the server's databases cannot be listed ({exc.message}); showing backups")
    if args.json:
        rows = [
            _json_row(r, n) for n in names for r in _list_rows(list_backups(server.for_database(n)))
        ]
        say(json.dumps(rows, indent=2))
        return 0
    if not names:
        say(f"no databases and no backups for target '{server.name}' in {server.backup_dir}")
    for name in names:
        say(f"== database {name}")
        _list_one(args, server.for_database(name), with_database=True)
    return 0


def _json_row(r: ListRow, database: str | None) -> dict[str, object]:
    row: dict[str, object] = {} if database is None else {"database": database}
    row.update(
        {
            "name": r.name,
            "path": str(r.path),
            "started_at": r.started_at.isoformat() if r.started_at else None,
            "size_bytes": r.size_bytes,
            "purpose": r.purpose,
            "status": r.status,
            "problem": r.note if r.status in ("failed", "damaged") else None,
            "dated_in_future": r.dated_in_future,
            "sha256": r.sha256,
            "encryption": r.encryption,
            "globals": r.globals,
        }
    )
    return row


def _list_one(args: argparse.Namespace, target: Target, *, with_database: bool) -> int:
    from backup_pipelines.engine.listing import human_age, human_size, list_backups

    listing = list_backups(target)
    rows = _list_rows(listing)
    if args.json:
        say(json.dumps([_json_row(r, target.database) for r in rows], indent=2))
        return 0
    if not rows:
        say(f"no backups for {target.label} in {target.backup_dir}")
    else:
        say(
            f"{'BACKUP':<48} {'TAKEN (UTC)':<20} {'AGE':>8} {'SIZE':>10}  {'PURPOSE':<12} "
            f"{'STATUS':<10} {'KEY':<12} NOTE"
        )
        for r in rows:
            taken = r.started_at.strftime("%Y-%m-%d %H:%M:%S") if r.started_at else "?"
            age = human_age(r.started_at, listing.now) if r.started_at else "?"
            size = human_size(r.size_bytes) if r.size_bytes is not None else "?"
            say(
                f"{r.name:<48} {taken:<20} {age:>8} {size:>10}  {r.purpose:<12} "
                f"{r.status:<10} {r.key:<12} {r.note}".rstrip()
            )
    if listing.partial_leftovers:
        say(
            f"({listing.partial_leftovers} .partial leftover(s) of interrupted backups; not backups)"
        )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    # Not load_project: broken targets are listed below with everything else, not as warnings.
    from backup_pipelines.engine.config import load_config
    from backup_pipelines.engine.preflight import project_problems

    config = load_config(args.config, isolate_targets=True)
    problems = project_problems(config)
    count = len(config.targets) + len(config.broken_targets)
    say(f"{config.source_path}: {count} target(s), backups in {config.resolved_backup_root}")
    for problem in problems:
        say(f"  {problem}")
    return EXIT_REFUSED if problems else 0


DATABASE_HELP = "one database of a server target (databases: all)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="back up a target now (every database of a server target, one by one)"
    )
    p.add_argument("target")
    p.add_argument("--database", help=DATABASE_HELP + "; default: every database of the server")
    p.add_argument(
        "--test", action="store_true", help="restore into a scratch database and compare row counts"
    )
    p.add_argument(
        "--skip-verify",
        action="store_true",
        help="skip re-reading the new backup (checksum + full decode); Dagster runs these as checks",
    )
    add_progress_option(p)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("verify", help="check a backup's checksum and readability")
    p.add_argument(
        "backup",
        help="path of the backup file, its s3://bucket/key offsite copy, or a target name "
        "(its newest backup; for a server target the newest of each database)",
    )
    p.add_argument("--database", help=DATABASE_HELP + " (with a target name)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help="list a target's backups, newest first")
    p.add_argument("target")
    p.add_argument("--database", help=DATABASE_HELP + "; default: every database")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "check-config", help="validate the targets file and its environment variables"
    )
    p.set_defaults(func=cmd_check_config)
